"""`raysys validate DIR`: check every table of a dataset directory against the data contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate a dataset directory against the data contract")
    p.add_argument("data", help="dataset directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.config import ConfigError  # lazy: keeps raysys --help fast
    from raysys.contract import validate_dataset  # lazy: keeps raysys --help fast

    if not Path(args.data).is_dir():  # a typo must not validate as an empty dataset
        raise ConfigError(f"{args.data}: {'is not a directory' if Path(args.data).exists() else 'does not exist'}")
    print(json.dumps({"valid": True, "counts": validate_dataset(args.data)}))
    return 0
