"""The `raysys` command. Subcommands live in `raysys.commands.*`; each module's `register`
adds its parsers. Command modules stay import-light (no torch/ray at import) so `raysys --help`
is instant; handlers import what they need.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raysys.config import ConfigError
from raysys.env import apply_offline_env
from raysys.plugins import load_plugins

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysys",
        description="Pre-train a vision-and-language transformer from unpaired image and text corpora, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
        help="import a module (or a .py file) that registers an objective, task or index backend; "
        "repeatable; also read from RAYSYS_PLUGINS (raysys.plugins)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        load_plugins(args.plugin)
        rc = args.func(args)
    except ValueError as e:  # ConfigError and ContractError are ValueErrors
        from raysys.contract import ContractError  # lazy: numpy + pyarrow would slow raysys --help

        if not isinstance(e, (ConfigError, ContractError)):
            raise
        print(f"raysys: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
