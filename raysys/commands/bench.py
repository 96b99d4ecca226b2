"""`raysys bench NAME`: throughput/memory benchmarks, each against a baseline measured in the same
run. Every bench prints, as its last line, one JSON object. Benches register here by name."""

from __future__ import annotations

import argparse
import importlib
import json

# name -> module with `add_arguments(parser)` and `run(args) -> dict`
BENCHES: dict[str, str] = {
    "featurize": "raysys.bench.featurize",
    "embed": "raysys.bench.embed",
    "retrieve": "raysys.bench.retrieve",
    "train": "raysys.bench.train",
    "zeroshot-flickr8k": "raysys.bench.zeroshot",
    "device": "raysys.bench.device",
    "startup": "raysys.bench.startup",
    "ingest": "raysys.bench.ingest",
    "towers": "raysys.bench.towers",
    "grounding": "raysys.bench.grounding",
    "separation": "raysys.bench.separation",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against a same-run baseline; last line is JSON")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    bsub.required = True
    for name, mod in BENCHES.items():
        m = importlib.import_module(mod)
        bp = bsub.add_parser(name, help=(m.__doc__ or "").strip().splitlines()[0])
        m.add_arguments(bp)
        bp.set_defaults(func=lambda a, m=m: _run(m, a))


def _run(module, args) -> int:
    result = module.run(args)
    print(json.dumps(result))
    return 0
