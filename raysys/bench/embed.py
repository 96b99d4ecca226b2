"""Embedding throughput: the Ray Data pipeline (`raysys embed`) vs a bare SentenceTransformer.encode loop.

Both embed the same sentences in the same run: real English sentences from the shared data
folder (COCO Karpathy and Flickr8k captions, Conceptual Captions, Brown), tiled to `--n`. The
pipeline is measured end to end (Parquet in → actors start and load the model → Parquet shards
out); the baseline is the model's `encode` in this process over the same sentences in blocks of
the same size, model load excluded. Peak RSS covers this process and every Ray worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # <repo>/../shared/data


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=200_000, help="sentences (default 200,000)")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per forward pass (both sides)")
    p.add_argument("--block-rows", type=int, default=2048, help="rows per actor call / baseline encode call")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per input Parquet shard")
    p.add_argument("--actors", type=int, default=0, help="pipeline actors (default: one per CPU)")
    p.add_argument("--cpus", type=int, default=0, help="Ray CPUs and baseline torch threads (default: all)")
    p.add_argument("--shared", default=os.environ.get("RAYSYS_SHARED_DATA", str(DEFAULT_SHARED)), help="shared data folder")
    p.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir, removed)")


def real_sentences(n: int, shared: str | os.PathLike, skip: int = 0) -> tuple[list[str], str]:
    """`n` real sentences from the shared data (distinct where possible, then tiled); and a description."""
    root = Path(shared)
    found: list[str] = []
    used = []
    coco = sorted((root / "text" / "coco_karpathy_captions").glob("mscoco_*.json"))
    for f in coco:
        found += [c.strip() for e in json.loads(f.read_text()) for c in e["captions"]]
    if coco:
        used.append("COCO Karpathy captions")
    f = root / "flickr8k" / "captions.tsv"
    if f.exists():
        found += [line.split("\t")[2].strip() for line in f.read_text().splitlines()[1:] if line.count("\t") >= 2]
        used.append("Flickr8k captions")
    f = root / "text" / "cc3m_val_captions"
    for g in sorted(f.glob("*")) if f.is_dir() else []:
        if g.is_file() and g.suffix in (".tsv", ".txt"):
            found += [line.split("\t")[0].strip() for line in g.read_text(errors="replace").splitlines()]
            used.append("Conceptual Captions val")
            break
    f = root / "text" / "brown_sentences.txt"
    if f.exists():
        found += [line.strip() for line in f.read_text(errors="replace").splitlines()]
        used.append("Brown sentences")
    found = list(dict.fromkeys(s for s in found if s))  # distinct, order kept
    if not found:
        raise SystemExit(f"bench: no shared sentences under {root} (set --shared)")
    found = found[skip:] + found[:skip]
    reps = -(-n // len(found))
    out = (found * reps)[:n]
    return out, f"{min(n, len(found))} distinct real sentences ({', '.join(used)}), tiled x{reps} to {n}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np  # lazy: keeps raysys --help fast
    import pyarrow as pa  # lazy: keeps raysys --help fast

    from raysys.contract import (  # lazy: keeps raysys --help fast
        TEXTS_SCHEMA,
        shard_name,
        write_parquet_atomic,
    )
    from raysys.corpus.embedding import (  # lazy: keeps raysys --help fast
        EmbedConfig,
        embed,
        encode_deterministic,
        load_model,
        read_embeddings,
    )
    from raysys.rss import PeakRSS  # lazy: keeps raysys --help fast

    cpus = args.cpus or os.cpu_count() or 1
    sentences, what = real_sentences(args.n, args.shared)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raysys-bench-embed-"))
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    for s, lo in enumerate(range(0, len(sentences), args.shard_rows)):
        chunk = sentences[lo : lo + args.shard_rows]
        ids = [f"s{lo + i:09d}" for i in range(len(chunk))]
        write_parquet_atomic(pa.table({"text_id": ids, "text": chunk, "source": ["bench"] * len(chunk)}, schema=TEXTS_SCHEMA),
                             data / "texts" / shard_name(s))  # fmt: skip
    result: dict[str, Any] = {"bench": "embed", "data": what, "n": len(sentences), "cpus": cpus}
    with PeakRSS() as total:
        # Baseline: bare encode loop in this process, all CPUs as torch threads, model load excluded.
        import torch  # lazy: keeps raysys --help fast

        torch.set_num_threads(cpus)
        model = load_model("", "cpu")
        model.encode(sentences[:64], batch_size=args.batch_size)  # warm-up
        with PeakRSS() as base_rss:
            t0 = time.perf_counter()
            base = np.empty((len(sentences), 384), np.float32)
            for lo in range(0, len(sentences), args.block_rows):
                base[lo : lo + args.block_rows] = model.encode(
                    sentences[lo : lo + args.block_rows], batch_size=args.batch_size, normalize_embeddings=True,
                    convert_to_numpy=True, show_progress_bar=False,
                )  # fmt: skip
            t_base = time.perf_counter() - t0
        # Determinism check of the pipeline's encoder against the bare loop (same model, same floats up to padding).
        det = encode_deterministic(model, sentences[:512], args.batch_size)
        del model

        import ray  # lazy: keeps raysys --help fast

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20,
                 _temp_dir=os.environ.get("RAYSYS_RAY_TMP", "/tmp/raysys-bench"))  # fmt: skip
        try:
            cfg = EmbedConfig(batch_size=args.batch_size, block_rows=args.block_rows, actors=args.actors or cpus,
                              cpus_per_actor=min(0.5, cpus / (2 * (args.actors or cpus))), threads_per_actor=1,
                              driver_rows=0)  # the actor pool, also for small --n  # fmt: skip
            with PeakRSS() as pipe_rss:
                t0 = time.perf_counter()
                rep = embed(data, cfg, tables=("texts",))
                t_pipe = time.perf_counter() - t0
        finally:
            ray.shutdown()
        ids, vecs = read_embeddings(data, "texts")
    order = np.argsort(np.array(ids.to_pylist()))
    vecs = vecs[order]
    result.update(
        {
            "sentences_per_s": round(len(sentences) / t_pipe, 1),
            "baseline_sentences_per_s": round(len(sentences) / t_base, 1),
            "ratio": round(t_base / t_pipe, 3),
            "pipeline_seconds": round(t_pipe, 1),
            "baseline_seconds": round(t_base, 1),
            "pipeline_actors": cfg.actors,
            "baseline_threads": cpus,
            "rows_written": rep["texts"]["rows"],
            "max_abs_diff_vs_baseline": float(np.abs(vecs - base).max()),
            "max_abs_diff_grouped_vs_bare": float(np.abs(det - base[:512]).max()),
            "peak_rss_mb": total.peak_mb,
            "peak_rss_pipeline_mb": pipe_rss.peak_mb,
            "peak_rss_baseline_mb": base_rss.peak_mb,
        }
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result
