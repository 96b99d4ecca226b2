"""Multi-granular pre-training as a Ray job: the pipeline's `pretrain` stage on OUT/data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config configs/demo.yaml --out /mnt/shared/raysys/demo

Runs Ray Train (TorchTrainer, DDP over the cluster's GPU workers) with the `pretrain:` section of
the pipeline config. Needs OUT/data with pairs/ and phrases/ (jobs/retrieve.py). On a multi-node
cluster the config's storage path and MLflow tracking URI must point at shared storage (s3://,
gs://, or a shared mount); see docs/cluster.md. Re-submitting with the same run name resumes from
the latest checkpoint. Prints OUT/summary.json as its last line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

STAGES = ["pretrain"]  # names in raysys.experiments.pipeline.STAGES
DESCRIPTION = (
    "Pre-train the single-stream model on Ray Train (R-T / R-P / I-S with the w_ITM curriculum) "
    "on the Ray cluster this job is attached to."
)
OUT_HELP = "run directory or URI holding the dataset in OUT/data"

if __name__ == "__main__":
    sys.exit(_common.stage_main("jobs/pretrain.py", DESCRIPTION, out_help=OUT_HELP, stages=STAGES))
