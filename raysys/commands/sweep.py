"""`raysys sweep` and `raysys report`: Ray Tune ablations logged to MLflow, and the paper-style report."""

from __future__ import annotations

import argparse
import json
import os

from raysys import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune ablation sweep (pre-train, fine-tune on the downstream suite, zero-shot per trial), logged to MLflow")
    p.add_argument("--config", required=True, help="sweep YAML (e.g. configs/demo_sweep.yaml)")
    p.add_argument("--out", default=None, help="output dir (default: sweeps/<name>); MLflow store at OUT/mlflow.db")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the trial list, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SweepConfig overrides, e.g. seeds=[0,1]")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="write report.md + PNG plots (tables, bootstrap intervals, the paper's directions) from a sweep's MLflow experiment")
    p.add_argument("--tracking-uri", default=None,
                   help="the sweep's store, e.g. sqlite:///sweeps/demo/mlflow.db (default: MLFLOW_TRACKING_URI); "
                   "a sqlite file that does not exist is an error")  # fmt: skip
    p.add_argument("--experiment", required=True, help="the sweep's MLflow experiment name")
    p.add_argument("--out", required=True, help="directory for report.md and the plots")
    p.set_defaults(func=_report)


def _sweep(args: argparse.Namespace) -> int:
    from raysys.experiments.rundir import local_run_dir  # lazy: keeps raysys --help fast
    from raysys.experiments.sweep import SweepConfig, dry_run, run_sweep  # lazy: keeps raysys --help fast

    cfg = config.load(SweepConfig, args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg), end="")
        return 0
    with local_run_dir(args.out or f"sweeps/{cfg.name}") as out:
        result = run_sweep(cfg, out)
    print(json.dumps(result, default=str))
    return 0


def _report(args: argparse.Namespace) -> int:
    from raysys.experiments.report import write_report  # lazy: keeps raysys --help fast

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise config.ConfigError("report: give --tracking-uri (the sweep's store) or set MLFLOW_TRACKING_URI")
    print(json.dumps(write_report(uri, args.experiment, args.out)))
    return 0
