"""Sharded FAISS retrieval vs one IndexFlatIP, and the IVF option vs exact, on sentence-like vectors.

Data: i.i.d. Gaussian vectors are the one case where no index beats brute force, so the corpus
has the structure of real sentence embeddings. `--bases` real shared sentences (captions) are
embedded with the packaged MiniLM; corpus row i is `normalise(base[j] + noise)` with `j` drawn
per row and Gaussian noise of total norm ≈ `--noise` (cos to its base ≈ 1/sqrt(1 + noise²)).
Queries are built the same way from *other* real sentences, so a query's neighbours are noisy
copies of the few corpus sentences closest in meaning. Rows are generated block by block from
seeds, so every shard actor builds its own rows and the corpus never travels through Ray.

Checks: the sharded exact search returns the single index's top-K (identical ids except order
among ties at the K-th score, scores within 1e-5); its time ratio to the single index; IVF
recall@K vs exact and its speed vs the sharded exact search; peak RSS of this process + workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 65_536


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysys.bench.embed import DEFAULT_SHARED  # lazy: keeps raysys --help fast

    p.add_argument("--n-corpus", type=int, default=1_000_000)
    p.add_argument("--n-queries", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--ivf", default="IVF1024,Flat", help="index_factory string of the approximate option")
    p.add_argument("--nprobe", type=int, default=12)
    p.add_argument("--train-size", type=int, default=65_536, help="IVF training sample per shard")
    p.add_argument("--bases", type=int, default=10_000, help="real sentences behind the corpus")
    p.add_argument("--query-bases", type=int, default=2_000, help="other real sentences behind the queries")
    p.add_argument("--noise", type=float, default=0.5, help="noise norm added to each base before normalising")
    p.add_argument("--query-batch", type=int, default=4096)
    p.add_argument("--cpus", type=int, default=0, help="Ray CPUs / FAISS threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", default=os.environ.get("RAYSYS_SHARED_DATA", str(DEFAULT_SHARED)), help="shared data folder")
    p.add_argument("--cache-dir", default=os.environ.get("RAYSYS_CACHE", str(Path.home() / ".cache" / "raysys")),
                   help="where the base sentences' embeddings are cached ('' = no cache)")  # fmt: skip


def base_embeddings(sents: list[str], cache_dir: str, cpus: int) -> tuple[np.ndarray, bool]:
    """MiniLM embeddings of the base sentences, cached by content (embedding them is the slow part)."""
    key = hashlib.sha1("\n".join(["packaged:all-MiniLM-L6-v2", *sents]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"bench-retrieve-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path), True
    import torch  # lazy: keeps raysys --help fast

    from raysys.corpus.embedding import load_model  # lazy: keeps raysys --help fast

    torch.set_num_threads(cpus)
    model = load_model("", "cpu")
    emb = model.encode(sents, batch_size=128, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False).astype(np.float32)  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
    return emb, False


def synth_rows(bases: np.ndarray, seed: int, noise: float, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of the synthetic corpus; any range gives the same rows as the whole."""
    d = bases.shape[1]
    out = np.empty((hi - lo, d), np.float32)
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1 if hi > lo else lo // BLOCK):
        rng = np.random.default_rng(np.random.SeedSequence([seed, b]))
        j = rng.integers(len(bases), size=BLOCK)
        x = bases[j] + rng.standard_normal((BLOCK, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        a, z = max(lo, b * BLOCK), min(hi, (b + 1) * BLOCK)
        out[a - lo : z - lo] = x[a - b * BLOCK : z - b * BLOCK]
    return out


def compare_topk(D0: np.ndarray, I0: np.ndarray, D1: np.ndarray, I1: np.ndarray, tol: float = 1e-5) -> dict[str, Any]:
    """Same top-K up to reordering among ties at the K-th score, with scores within `tol`?"""
    max_diff = float(np.abs(np.sort(D0, 1) - np.sort(D1, 1)).max())
    same = (np.sort(I0, 1) == np.sort(I1, 1)).all(axis=1)
    bad = 0
    for q in np.flatnonzero(~same):
        kth = D0[q, -1]
        s0, s1 = set(I0[q].tolist()), set(I1[q].tolist())
        only0 = [D0[q, i] for i in range(I0.shape[1]) if I0[q, i] not in s1]
        only1 = [D1[q, i] for i in range(I1.shape[1]) if I1[q, i] not in s0]
        if any(abs(s - kth) > tol for s in only0 + only1):
            bad += 1
    return {
        "exact_identical": bool(bad == 0 and max_diff <= tol),
        "max_score_diff": max_diff,
        "queries_differing_only_by_ties": int((~same).sum()) - bad,
        "queries_differing": bad,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss  # lazy: keeps raysys --help fast

    from raysys.bench.embed import real_sentences  # lazy: keeps raysys --help fast
    from raysys.corpus.index import IndexOptions  # lazy: keeps raysys --help fast
    from raysys.corpus.retrieval import ShardedIndex, shard_ranges  # lazy: keeps raysys --help fast
    from raysys.rss import PeakRSS  # lazy: keeps raysys --help fast

    cpus = args.cpus or os.cpu_count() or 1
    result: dict[str, Any] = {"bench": "retrieve", "n_corpus": args.n_corpus, "n_queries": args.n_queries, "k": args.k,
                              "shards": args.shards, "cpus": cpus}  # fmt: skip
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        sents, _ = real_sentences(args.bases + args.query_bases, args.shared)
        emb, result["bases_cached"] = base_embeddings(sents, args.cache_dir, cpus)
        bases, qbases = emb[: args.bases], emb[args.bases :]
        result["data"] = (
            f"MiniLM embeddings of {len(bases)} real shared sentences (captions), each corpus row one of them plus "
            f"Gaussian noise of norm {args.noise}, re-normalised; queries the same from {len(qbases)} other sentences"
        )
        result["seconds_data"] = round(time.perf_counter() - t0, 1)
        Q = synth_rows(qbases, args.seed + 1, args.noise, 0, args.n_queries)
        gen = partial(synth_rows, bases, args.seed, args.noise)

        # 1. one IndexFlatIP in this process, all threads
        faiss.omp_set_num_threads(cpus)
        single = faiss.IndexFlatIP(bases.shape[1])
        for lo in range(0, args.n_corpus, BLOCK):
            single.add(gen(lo, min(args.n_corpus, lo + BLOCK)))
        t0 = time.perf_counter()
        D0, I0 = single.search(Q, args.k)
        t_single = time.perf_counter() - t0
        del single

        import ray  # lazy: keeps raysys --help fast

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20,
                 _temp_dir=os.environ.get("RAYSYS_RAY_TMP", "/tmp/raysys-bench"))  # fmt: skip
        try:
            ranges = shard_ranges(args.n_corpus, args.shards)
            loaders = [partial(gen, lo, hi) for lo, hi in ranges]
            threads = max(1, cpus // args.shards)

            # 2. sharded exact: one Flat index per Ray actor, exact merge
            t0 = time.perf_counter()
            exact = ShardedIndex(loaders, ranges, IndexOptions("Flat", threads=threads),
                                 cpus_per_shard=min(1.0, cpus / args.shards / 2), gpu=False)  # fmt: skip
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            D1, I1 = exact.search(Q, args.k, args.query_batch)
            t_sharded = time.perf_counter() - t0
            exact.close()

            # 3. the IVF option, same shards
            t0 = time.perf_counter()
            ivf = ShardedIndex(loaders, ranges, IndexOptions(args.ivf, args.nprobe, args.train_size, args.seed, threads),
                               cpus_per_shard=min(1.0, cpus / args.shards / 2), gpu=False)  # fmt: skip
            t_ivf_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            D2, I2 = ivf.search(Q, args.k, args.query_batch)
            t_ivf = time.perf_counter() - t0
            ivf.close()
        finally:
            ray.shutdown()
    cmp = compare_topk(D0, I0, D1, I1)
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(I0.tolist(), I2.tolist())]))
    result.update(cmp)
    result.update(
        {
            "single_seconds": round(t_single, 2),
            "sharded_seconds": round(t_sharded, 2),
            "speed_ratio": round(t_single / t_sharded, 3),
            "sharded_build_seconds": round(t_build, 2),
            "ivf_index": args.ivf,
            "ivf_nprobe": args.nprobe,
            "ivf_recall_at_10" if args.k == 10 else f"ivf_recall_at_{args.k}": round(recall, 4),
            "ivf_seconds": round(t_ivf, 2),
            "ivf_build_seconds": round(t_ivf_build, 2),
            "ivf_speed_ratio": round(t_sharded / t_ivf, 3),
            "ivf_speed_vs_single": round(t_single / t_ivf, 3),
            "peak_rss_mb": rss.peak_mb,
        }
    )
    result.setdefault("ivf_recall_at_10", result.get(f"ivf_recall_at_{args.k}"))
    return result
