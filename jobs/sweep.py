"""Ablation sweep as a Ray job: `raysys.experiments.sweep.run_sweep` (Ray Tune over pre-train + zero-shot).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/sweep.py --config configs/demo_sweep.yaml --out /mnt/shared/raysys/sweep

The sweep config (search space, scheduler, MLflow tracking URI, ...) is the one `raysys sweep`
reads; its MLflow store defaults to OUT/mlflow.db. On a multi-node cluster the Tune/Train storage
path and the tracking URI must be shared storage (docs/cluster.md). Re-submitting resumes the
sweep without re-running finished trials. Prints the sweep result (experiment, tracking_uri,
trials, best) as its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysys import config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def run(args: argparse.Namespace) -> dict | None:
    from raysys.experiments.sweep import SweepConfig, dry_run, run_sweep  # lazy: keeps --help instant

    cfg = config.load(SweepConfig, args.config, args.overrides)
    if args.dry_run:
        return _common.dry_run(cfg, dry_run(cfg))
    return _common.on_cluster(args, lambda out: run_sweep(cfg, out))


def build_parser() -> argparse.ArgumentParser:
    return _common.parser(
        "jobs/sweep.py",
        "Run a Ray Tune ablation sweep (each trial pre-trains and evaluates zero-shot; one MLflow "
        "run per trial) on the Ray cluster this job is attached to.",
        out_help="sweep directory or URI (MLflow store OUT/mlflow.db unless the config names one)",
    )


if __name__ == "__main__":
    sys.exit(_common.main(run, build_parser().parse_args()))
