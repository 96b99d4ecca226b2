"""Weakly aligned corpus as a Ray job: the pipeline's `retrieval` and `phrases` stages on OUT/data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/retrieve.py --config configs/demo.yaml --out /mnt/shared/raysys/demo retrieval.k=10

Needs a dataset at OUT/data (from jobs/featurize.py or jobs/pipeline.py). Embeds tags and
sentences, runs the sharded FAISS top-K search (pairs/), then noun phrases and their region links
(phrases/), with the config sections `retrieval:` / `phrases:` of the pipeline config. Both stages
skip finished shards, so re-submitting after a failure resumes. Prints OUT/summary.json as its last
line. `--stages retrieval` runs one of the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

STAGES = ["retrieval", "phrases"]  # names in raysys.experiments.pipeline.STAGES
DESCRIPTION = (
    "Embed, retrieve top-K sentences per image (sharded FAISS) and extract linked noun phrases, "
    "on the Ray cluster this job is attached to."
)
OUT_HELP = "run directory or URI holding the dataset in OUT/data"

if __name__ == "__main__":
    sys.exit(_common.stage_main("jobs/retrieve.py", DESCRIPTION, out_help=OUT_HELP, stages=STAGES, choose=True))
