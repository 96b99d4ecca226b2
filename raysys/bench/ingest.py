"""Pre-training input at growing corpus sizes: streamed (Ray Data windows) vs in-memory, per worker.

For each size it builds a demo world (`--feature-dim` wide, so that 200k images fit this disk) and
a K-texts-per-image pairs table from the world's gold captions, with no retrieval: the bench
measures ingest, not retrieval quality. Then `raysys assemble`, and for each worker count a
fixed number of Ray Train steps of a 2-layer model (R-T + I-S, joint) through the streamed path
and, up to `--memory-max` images, through the in-memory path (`input=memory`), in one Ray
session. Per run it reports each training worker's peak RSS (sampled in the worker), global
samples/s over the steps after `--warmup` (the first steps pay for actor start-up and allocator
warm-up), and the share of the loop a worker waited for its data after its first step.

`--sizes 20000,60000,200000 --workers 1,2` is the issue-16 table (docs/scale.md). The last line
is JSON: one entry per (path, size, workers) and the two checks: streamed RSS growth (largest ÷
smallest size, ≤ 1.25) and streamed ÷ in-memory samples/s at the smallest size with the most
workers (≥ 0.9).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys.contract import PAIRS_SCHEMA, read_table, shard_files, shard_name, write_parquet_atomic
from raysys.rss import PeakRSS

RSS_GROWTH_MAX = 1.25
THROUGHPUT_MIN = 0.9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="20000,60000,200000", help="world sizes in images (default 20000,60000,200000)")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts (default 1,2)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of samples/s (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="per-worker batch (default 16)")
    p.add_argument("--feature-dim", type=int, default=256, help="region feature width of the worlds (default 256)")
    p.add_argument("--k", type=int, default=5, help="texts per image in the pairs table (default 5)")
    p.add_argument("--memory-max", type=int, default=200000, help="largest size the in-memory path runs (default 200000)")
    p.add_argument("--window-images", type=int, default=256, help="streamed window size (default 256)")
    p.add_argument("--work", default="", help="keep worlds here and reuse them (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)


def build(n: int, dim: int, k: int, out: Path, seed: int) -> Path:
    """A world of n images, its K-gold-texts pairs table and its training examples (reused when
    `out` already holds them)."""
    from raysys.corpus.assemble import AssembleConfig, assemble
    from raysys.data.world import WorldConfig, write_world

    if (out / "examples").is_dir() and shard_files(out, "examples"):
        return out
    if out.exists():
        shutil.rmtree(out)
    write_world(WorldConfig(images=n, seed=seed, feature_dim=dim), out)
    gold = read_table(out, "gold", ["image_id", "text_id"])
    for i, f in enumerate(shard_files(out, "images")):
        ids = pq.read_table(f, columns=["image_id"]).column(0)
        g = gold.filter(pc.is_in(gold.column("image_id"), value_set=ids)).sort_by([("image_id", "ascending"),
                                                                                   ("text_id", "ascending")])  # fmt: skip
        rows: dict[str, list] = {"image_id": [], "text_id": [], "rank": [], "score": []}
        last, r = None, 0
        for iid, tid in zip(g.column("image_id").to_pylist(), g.column("text_id").to_pylist()):
            r = r + 1 if iid == last else 0
            last = iid
            if r < k:
                rows["image_id"].append(iid)
                rows["text_id"].append(tid)
                rows["rank"].append(r)
                rows["score"].append(1.0)
        write_parquet_atomic(pa.table(rows, schema=PAIRS_SCHEMA), out / "pairs" / shard_name(i))
    assemble(out, AssembleConfig(strict=False))
    return out


def one_run(data: Path, storage: Path, path: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    from raysys.pretrain.config import TrainConfig
    from raysys.pretrain.ray_train import fit, read_checkpoint_metrics

    cfg = TrainConfig(workers=workers, model_layers=2, batch_size=args.batch_size, steps=args.steps,
                      granularities=["rt", "is"], mixing="joint", input=path, window_images=args.window_images,
                      tracking_uri="none", log_every=0, checkpoint_every=0, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    with PeakRSS(interval=0.5) as tree:
        res = fit(cfg, data, f"{path}-{workers}", storage, log_model=False)
    m = read_checkpoint_metrics(res["checkpoint"])
    warm = min(args.warmup, len(m["step_seconds"]) - 1)
    samples = sum(m["step_samples"][warm:]) * workers  # every rank runs the same batch sizes
    return {
        "path": path,
        "images": None,
        "workers": workers,
        "steps": res["steps"],
        "peak_rss_mb_per_worker": [round(x, 1) for x in res["peak_rss_mb_per_worker"]],
        "samples_per_s": round(samples / sum(m["step_seconds"][warm:]), 2),  # after the warm-up steps
        "data_wait_share": round(max(res["data_wait_share_per_worker"]), 3),
        "examples_rows_read_per_worker": res.get("examples_rows_read_per_worker"),
        "peak_rss_mb_all_processes": tree.peak_mb,  # driver + every Ray process (actors, object store)
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def collate_rate(data: Path, args: argparse.Namespace, seconds: float = 20.0) -> float:
    """Samples/s one process collates (read window, tokenise, mask, ITM negatives, pad): the CPU
    cost per sample a streamed run pays in its Ray Data actors."""
    from raysys.pretrain.config import TrainConfig
    from raysys.pretrain.recipes import resolve
    from raysys.pretrain.stream import local_rows, plan, rank_items

    cfg = TrainConfig(batch_size=args.batch_size, granularities=["rt", "is"], mixing="joint",
                      window_images=args.window_images, seed=args.seed)  # fmt: skip
    p = plan(data, cfg, resolve(cfg), 1)
    n, t0 = 0, time.perf_counter()
    for _, _, _, batches in local_rows(p, cfg, rank_items(p, cfg.seed, 0, 10**6)):
        n += sum(int(b["input_ids"].shape[0]) for b in batches)
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def plan_seconds(data: Path, args: argparse.Namespace) -> float:
    """The driver's window plan (every fit and every resume pays it once): reads the examples'
    small columns, never the features."""
    from raysys.pretrain.config import TrainConfig
    from raysys.pretrain.recipes import resolve
    from raysys.pretrain.stream import plan

    cfg = TrainConfig(batch_size=args.batch_size, granularities=["rt", "is"], mixing="joint",
                      window_images=args.window_images, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    plan(data, cfg, resolve(cfg), 2)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raysys.pretrain.ray_train import ensure_ray

    sizes = [int(x) for x in args.sizes.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raysys-bench-ingest-"))
    started = ensure_ray()
    entries: list[dict[str, Any]] = []
    plans: dict[int, float] = {}
    try:
        for n in sizes:
            t0 = time.perf_counter()
            data = build(n, args.feature_dim, args.k, work / f"world-{n}", args.seed)
            print(f"[ingest] world {n}: built in {time.perf_counter() - t0:.0f} s", flush=True)
            plans[n] = plan_seconds(data, args)
            print(f"[ingest] world {n}: the driver's window plan takes {plans[n]:.1f} s", flush=True)
            if n == min(sizes):
                rate = collate_rate(data, args)
                print(f"[ingest] collation in one process: {rate:.0f} samples/s", flush=True)
            for w in workers:
                for path in ("stream", "memory") if n <= args.memory_max else ("stream",):
                    storage = work / f"runs-{n}"
                    shutil.rmtree(storage / f"{path}-{w}", ignore_errors=True)
                    e = one_run(data, storage, path, w, args)
                    e["images"] = n
                    entries.append(e)
                    print(_row(e), flush=True)
    finally:
        if started:
            import ray  # lazy: started above

            ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return {"bench": "ingest", "entries": entries, **_checks(entries, sizes, workers), "collate_samples_per_s_per_process": round(rate, 1),
            "plan_s": {str(n): round(v, 2) for n, v in plans.items()},
            "load_avg": os.getloadavg()[0], "feature_dim": args.feature_dim, "steps": args.steps}  # fmt: skip


def _row(e: dict[str, Any]) -> str:
    rss = "/".join(f"{x:.0f}" for x in e["peak_rss_mb_per_worker"])
    return (f"[ingest] {e['path']:<6} images={e['images']:<7} workers={e['workers']} rss_mb={rss:<11} "
            f"samples/s={e['samples_per_s']:<7} data_wait={e['data_wait_share']}")  # fmt: skip


def _checks(entries: list[dict[str, Any]], sizes: list[int], workers: list[int]) -> dict[str, Any]:
    def get(path: str, n: int, w: int) -> dict[str, Any] | None:
        return next((e for e in entries if (e["path"], e["images"], e["workers"]) == (path, n, w)), None)

    out: dict[str, Any] = {}
    lo, hi, w = min(sizes), max(sizes), max(workers)
    a, b = get("stream", lo, w), get("stream", hi, w)
    if a and b and hi > lo:
        out["stream_rss_growth"] = round(max(b["peak_rss_mb_per_worker"]) / max(a["peak_rss_mb_per_worker"]), 3)
        out["stream_rss_growth_ok"] = out["stream_rss_growth"] <= RSS_GROWTH_MAX
    m = get("memory", lo, w)
    if a and m:
        out["throughput_ratio"] = round(a["samples_per_s"] / m["samples_per_s"], 3)
        out["throughput_ok"] = out["throughput_ratio"] >= THROUGHPUT_MIN
    return out
