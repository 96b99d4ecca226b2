"""`raysys embed`, `raysys retrieve`, `raysys phrases`, `raysys assemble`: the weakly aligned corpus,
stage by stage, and the training examples made of it.

Settings come from the `retrieval` / `phrases` / `assemble` sections of a pipeline YAML (`--config`), then
`key=value` overrides (relative to the section: `k=10`, `embed.batch_size=64`), then the flags.
Each stage holds DIR's lock while it writes (`raysys.locks`): a second run on DIR exits 2 naming
the first. `--dry-run` prints the resolved config as one JSON line and does nothing else.
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset directory (images/, texts/, ...)")
    p.add_argument("--config", default=None, help="pipeline YAML; its section for this stage is used")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config (one JSON line) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides within the section")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed image-tag queries and texts → DIR/embeddings/{images,texts}/ (Ray Data)")
    _common(p)
    p.add_argument("--tables", default="images,texts", help="which tables to embed (default: images,texts)")
    p.add_argument("--model", default=None, help="sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences per forward pass")
    p.add_argument("--actors", type=int, default=None, help="embedding actors (default: one per GPU, else per CPU)")
    p.set_defaults(func=_embed)

    p = sub.add_parser("retrieve", help="top-K texts per image by sharded index search (FAISS) → DIR/pairs/ + diagnostics")
    _common(p)
    p.add_argument("--k", type=int, default=None, help="sentences per image (default 5)")
    p.add_argument("--shards", type=int, default=None, help="index shards, one Ray actor each (default 2)")
    p.add_argument("--backend", default=None,
                   help="index backend by registered name (default faiss; a --plugin module may register more)")  # fmt: skip
    p.add_argument("--index", default=None, help="faiss index_factory string (default Flat = exact; e.g. IVF1024,Flat)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (HNSW: efSearch)")
    p.add_argument("--model", default=None, help="sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--encoder", default=None, metavar="CHECKPOINT",
                   help="embed with a two-stage checkpoint's towers instead (a second round of corpus building)")  # fmt: skip
    p.set_defaults(func=_retrieve)

    p = sub.add_parser("phrases", help="noun phrases of retrieved sentences linked to regions → DIR/phrases/")
    _common(p)
    p.set_defaults(func=_phrases)

    p = sub.add_parser("assemble", help="training examples: one row per image with its retrieved texts → DIR/examples/")
    _common(p)
    p.add_argument("--k", type=int, default=None, help="keep retrieved texts with rank < k (default: all stored ranks)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random_pairs texts (default 0)")
    p.add_argument("--check", action="store_true", help="only validate DIR/examples/ (exit 2 with one line when bad)")
    p.set_defaults(func=_assemble)


def _flags(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    import json

    out = list(args.overrides or [])
    for attr, key in mapping.items():
        v = getattr(args, attr, None)
        if v is not None:
            out.append(f"{key}={json.dumps(v) if isinstance(v, str) else v}")
    return out


def _retrieval_cfg(args: argparse.Namespace, mapping: dict[str, str]):
    from raysys import config
    from raysys.corpus.retrieval import RetrievalConfig

    cfg = config.load(RetrievalConfig, args.config, _flags(args, mapping), section="retrieval")
    cfg.check()
    return cfg


def _dataset_dir(args: argparse.Namespace) -> None:
    """--data must be an existing dataset directory: these stages add tables to one."""
    from pathlib import Path

    from raysys.config import ConfigError

    d = Path(args.data)
    if not d.is_dir():
        what = "does not exist" if not d.exists() else "is not a directory"
        raise ConfigError(f"{args.data}: {what}; --data names a dataset directory (raysys world / import / featurize)")


def _with_ray(args: argparse.Namespace, fn):
    """Run a stage holding DIR's lock; it starts Ray itself only once its inputs passed validation
    (bad input fails in a second, not after a cluster start). Shut down a Ray that the stage started."""
    import ray

    from raysys.locks import output_lock

    _dataset_dir(args)
    was_up = ray.is_initialized()
    try:
        with output_lock(args.data):
            return fn()
    finally:
        if not was_up and ray.is_initialized():
            ray.shutdown()


def _print(report: dict) -> int:
    """The last stdout line of every command: one compact JSON object."""
    import json

    print(json.dumps(report, default=str, separators=(",", ":")))
    return 0


def _dry_run(cfg) -> int:
    from raysys import config

    return _print(config.to_dict(cfg))


def _embed(args: argparse.Namespace) -> int:
    from raysys.corpus.embedding import embed

    cfg = _retrieval_cfg(args, {"model": "embed.model", "batch_size": "embed.batch_size", "actors": "embed.actors"})
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = set(tables) - {"images", "texts"}
    if bad or not tables:
        from raysys.config import ConfigError

        raise ConfigError(f"embed --tables: unknown {sorted(bad) or tables}; use images and/or texts")
    if args.dry_run:
        return _dry_run(cfg.embed)
    return _print(_with_ray(args, lambda: embed(args.data, cfg.embed, tables)))


def _retrieve(args: argparse.Namespace) -> int:
    from raysys.corpus.retrieval import retrieve

    cfg = _retrieval_cfg(args, {"k": "k", "shards": "shards", "backend": "backend", "index": "index", "nprobe": "nprobe",
                                "model": "embed.model"})
    encoder = None
    if args.encoder:
        from raysys.evaluate.towers import TowerEncoder

        encoder = TowerEncoder(args.encoder, batch_size=cfg.embed.batch_size)
    if args.dry_run:
        return _dry_run(cfg)
    return _print(_with_ray(args, lambda: retrieve(args.data, cfg, encoder=encoder)))


def _phrases(args: argparse.Namespace) -> int:
    from raysys import config
    from raysys.corpus.phrases import PhrasesConfig, extract_phrases

    cfg = config.load(PhrasesConfig, args.config, list(args.overrides or []), section="phrases")
    if args.dry_run:
        return _dry_run(cfg)
    return _print(_with_ray(args, lambda: extract_phrases(args.data, cfg)))


def _assemble(args: argparse.Namespace) -> int:
    from raysys import config
    from raysys.corpus.assemble import AssembleConfig, assemble, check_examples
    from raysys.locks import output_lock

    if args.check:
        _dataset_dir(args)
        return _print(check_examples(args.data))
    cfg = config.load(AssembleConfig, args.config, _flags(args, {"k": "k", "seed": "seed"}), section="assemble")
    if args.dry_run:
        return _dry_run(cfg)
    _dataset_dir(args)
    with output_lock(args.data):
        return _print(assemble(args.data, cfg))
