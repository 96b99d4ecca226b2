"""Zero-shot evaluation as a Ray job: the pipeline's `zeroshot` and `report` stages on OUT/data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/demo.yaml --out /mnt/shared/raysys/demo

Scores the gold evaluation pairs with the ITM head of the checkpoint that the `pretrain` stage
recorded in OUT/summary.json (and of the un-pre-trained `base` model), and logs to that MLflow
run, then writes OUT/report.md (also logged to that run). Uses the `zeroshot:` section of the
pipeline config. Prints OUT/summary.json as its last line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

STAGES = ["zeroshot", "report"]  # names in raysys.experiments.pipeline.STAGES
DESCRIPTION = (
    "Zero-shot image<->text retrieval (R@1/5/10, ITM AUC) of the pre-trained model vs base, on "
    "the Ray cluster this job is attached to."
)
OUT_HELP = "run directory or URI holding OUT/data and the pretrain stage's OUT/summary.json"

if __name__ == "__main__":
    sys.exit(_common.stage_main("jobs/evaluate.py", DESCRIPTION, out_help=OUT_HELP, stages=STAGES))
