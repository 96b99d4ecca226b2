"""`raysys demo`: the README's demo, the whole pipeline on the embedded demo world."""

from __future__ import annotations

import argparse
import json

from raysys import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded demo world; writes OUT/summary.json")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml values built in)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. world.images=500")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.experiments.pipeline import PipelineConfig, run_pipeline  # lazy: keeps raysys --help fast
    from raysys.experiments.rundir import local_run_dir  # lazy: keeps raysys --help fast

    cfg = config.load(PipelineConfig, args.config, args.overrides)
    if args.dry_run:
        print(config.dump(cfg), end="")
        return 0
    with local_run_dir(args.out) as out:
        summary = run_pipeline(cfg, out)
    print(f"summary: {args.out}/summary.json")
    print(json.dumps(summary, default=str, separators=(",", ":")))
    return 0
