"""`raysys validate DIR`: check every table of a dataset directory against the data contract."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate a dataset directory against the data contract")
    p.add_argument("data", help="dataset directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raysys.contract import validate_dataset  # lazy: keeps raysys --help fast

    print(json.dumps({"valid": True, "counts": validate_dataset(args.data)}))
    return 0
