"""The `raysys` command. Subcommands live in `raysys.commands.*`; each module's `register`
adds its parsers. Command modules stay import-light (no torch/ray at import) so `raysys --help`
is instant; handlers import what they need.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from raysys.config import ConfigError
from raysys.contract import ContractError

# Order = order in `raysys --help`.
COMMAND_MODULES = [
    "raysys.commands.world",
    "raysys.commands.importers",
    "raysys.commands.validate",
    "raysys.commands.featurize",
    "raysys.commands.retrieve",
    "raysys.commands.pretrain",
    "raysys.commands.export",
    "raysys.commands.evaluate",
    "raysys.commands.sweep",
    "raysys.commands.demo",
    "raysys.commands.bench",
]


def offline_env() -> None:
    """Models come from installed packages only: never let a library reach for a hub."""
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }.items():
        os.environ.setdefault(k, v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysys",
        description="Pre-train a vision-and-language transformer from unpaired image and text corpora, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc = args.func(args)
    except (ContractError, ConfigError) as e:
        print(f"raysys: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
