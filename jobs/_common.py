"""Glue shared by the `ray job submit` entrypoints in `jobs/`.

Every entrypoint is a thin wrapper: parse `--config PATH [--out DIR] [key=value ...]`, attach to
Ray, call the library function its `raysys` command calls, print its result as the last line
(JSON). Everything that does work lives in `raysys/` (attaching: `raysys.raycluster.connect_ray`;
OUT as a path or URI: `raysys.experiments.rundir.local_run_dir`; stages: `run_pipeline`); this
file only holds what all entrypoints repeat.

Import-light on purpose (no ray, torch or raysys stage at import time): `python jobs/x.py --help`
must be instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysys import config, progress
from raysys.cli import quiet_loggers, run_guarded
from raysys.env import apply_offline_env
from raysys.raycluster import connect_ray

log = logging.getLogger("raysys.jobs")


def parser(prog: str, description: str, *, out_help: str) -> argparse.ArgumentParser:
    """The arguments every entrypoint shares; entrypoints add their own after this."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config", metavar="PATH", default=None, help="YAML config (yaml.safe_load; unknown keys are errors)"
    )
    p.add_argument("--out", metavar="DIR_OR_URI", required=True, help=out_help)
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to attach to: 'auto' (default: RAY_ADDRESS, else a cluster "
        "started by `ray start` on this node, else a new local one), 'local' "
        "(always a new private local Ray), or HOST:PORT",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit (no Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error (exit status 2)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides by dotted path, e.g. world.images=500 seed=1",
    )
    return p


def setup(args: argparse.Namespace) -> None:
    apply_offline_env()
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format=progress.LOG_FORMAT,
        stream=sys.stderr,
    )
    quiet_loggers(getattr(args, "verbose", False))


def on_cluster(args: argparse.Namespace, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Attach to Ray (`--address`), stage OUT (a path or a URI) and run `fn(out)` there."""
    from raysys.experiments.rundir import local_run_dir  # lazy: pyarrow; keeps --help instant

    log.info("ray: %s", connect_ray(args.address))
    with local_run_dir(args.out) as out:
        return fn(out)


def stage_job(args: argparse.Namespace, stages: list[str]) -> dict[str, Any] | None:
    """The body of every job that runs pipeline stages on OUT/data: `run_pipeline(cfg, out, stages)`."""
    from raysys.experiments.pipeline import PipelineConfig, check_stages, run_pipeline  # lazy: torch

    cfg = config.load(PipelineConfig, args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    check_stages(stages)  # fail before starting Ray or downloading anything
    return on_cluster(args, lambda out: run_pipeline(cfg, out, stages))


def stage_main(prog: str, description: str, *, out_help: str, stages: list[str], choose: bool = False) -> int:
    """A whole stage entrypoint: the shared parser (plus `--stages` when `choose`), then `stage_job`."""
    p = parser(prog, description, out_help=out_help)
    if choose:
        p.add_argument("--stages", nargs="+", choices=stages, default=stages, help="stages to run (default: all)")
    args = p.parse_args()
    return main(lambda a: stage_job(a, a.stages if choose else stages), args)


def main(fn: Callable[[argparse.Namespace], dict[str, Any] | None], args: argparse.Namespace) -> int:
    """Run an entrypoint body; a user error becomes one line on stderr and exit status 2 (the
    `raysys` command's rule, `raysys.cli.run_guarded`); its result is the last line, compact JSON."""
    setup(args)

    def body() -> int:
        result = fn(args)
        if result is not None:
            print(json.dumps(result, default=str, separators=(",", ":")))
        return 0

    return run_guarded(body, f"jobs/{Path(sys.argv[0]).name}", debug=getattr(args, "debug", False))


def dry_run(cfg: Any, text: str | None = None) -> None:
    """Print the resolved config (or `text`, a command's own dry-run output) instead of running."""
    print(config.dump(cfg) if text is None else text, end="")
