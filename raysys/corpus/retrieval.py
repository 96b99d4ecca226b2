"""The weakly aligned corpus R: sharded top-K retrieval of sentences for image-tag queries (paper §3.2).

The official code embedded and searched in one process with brute-force FAISS. Here the text
embeddings are split into N contiguous shards; each shard is an inner-product index held by one
Ray actor. The index is whatever backend `retrieval.backend` names (`raysys.corpus.index`): by
default FAISS, `faiss.index_factory(d, FACTORY, METRIC_INNER_PRODUCT)` (default `Flat`: exact
inner product, = cosine on unit vectors; `IVF…`, `PQ…`, `HNSW…` strings are trained on a seeded
sample of the shard; a GPU index when faiss-gpu sees a GPU). Query batches go to all shards in
parallel; each shard returns its top-K with *global* row numbers, and the driver merges them
exactly — score descending, then global row ascending — which is the global top-K. Global rows
map to the texts' own `text_id`s, so ids are stable whatever the shard count.

Output `pairs/part-i.parquet` holds the results for image shard *i* (`image_id, text_id, rank,
score`, rank 0-based). It exists only when complete, so a killed run redoes only the missing
shards. `pairs/_meta.json` records the search parameters and the embeddings it searched; a later
run with the same parameters and a smaller K reuses the stored top-max(K) (read it with
`read_pairs(data, k)`, which keeps `rank < k`), a larger K or other parameters recompute.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import progress
from raysys.config import ConfigError
from raysys.contract import (
    PAIRS_SCHEMA,
    ContractError,
    count_rows,
    read_table,
    shard_files,
    shard_name,
    update_manifest,
    write_parquet_atomic,
    write_text_atomic,
)
from raysys.corpus.diagnostics import retrieval_diagnostics, write_report
from raysys.corpus.embedding import (
    EmbedConfig,
    check_query_options,
    embed,
    fingerprint,
    model_id,
    read_vectors,
)
from raysys.corpus.index import IndexOptions, check_factory_string, check_index, get_index
from raysys.plugins import load_plugins
from raysys.raycluster import ensure_ray

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "faiss"


class Encoder(Protocol):
    """What `retrieve(encoder=...)` calls instead of `embed`: writes `embeddings/{images,texts}/`."""

    model_id: str

    def __call__(self, data: Path, on_shard: Callable[[Path], None] | None) -> dict[str, Any]: ...


@dataclass
class RetrievalConfig:
    """Top-K retrieval of texts for every image (the `retrieval` section of the pipeline config)."""

    k: int = 5  # paper: 5 (ablation 1, 5, 10)
    shards: int = 2  # index shards, one Ray actor each
    backend: str = DEFAULT_BACKEND  # index backend by registered name (raysys.corpus.index); plugins add more
    index: str = "Flat"  # faiss.index_factory string; "Flat" = exact inner product
    nprobe: int = 16  # IVF lists probed per query (efSearch for HNSW)
    train_size: int = 100_000  # training sample per shard for IVF/PQ/HNSW indexes
    query_batch: int = 4096  # queries sent to the shards at once
    threads_per_shard: int = 0  # FAISS OpenMP threads per shard actor; 0 = cluster CPUs / shards
    cpus_per_shard: float = 0.25  # Ray CPU reservation per shard actor (fractional: they mostly wait)
    gpu: bool = True  # use a GPU index when the cluster has GPUs and faiss sees one
    seed: int = 0  # training samples of the shards, the random-pair baseline, the examples
    examples: int = 5  # example images in the diagnostics
    diag_images: int = 10_000  # images sampled for the tag-coverage diagnostics
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    def check(self) -> None:
        if self.k < 1 or self.k > 32767:
            raise ConfigError(f"retrieval.k must be in 1..32767, got {self.k}")
        if self.shards < 1:
            raise ConfigError(f"retrieval.shards must be >= 1, got {self.shards}")
        if self.query_batch < 1:
            raise ConfigError(f"retrieval.query_batch must be >= 1, got {self.query_batch}")
        get_index(self.backend)  # unknown backend: a config error before anything runs
        if self.backend == DEFAULT_BACKEND:  # a bad factory string: refused before any embedding
            check_factory_string(self.index)
        check_query_options(self.embed)  # query form and tag source: refused before anything runs

    def index_options(self) -> IndexOptions:
        """The shards' index options; `ShardedIndex` fills in threads, per-shard seeds and GPUs."""
        return IndexOptions(self.index, self.nprobe, self.train_size, self.seed, self.threads_per_shard)


# ---------------------------------------------------------------- the shards


class ShardIndex:
    """Ray actor holding one shard: rows [offset, offset + n) of the corpus, in an index of backend `backend`.

    `plugins` are the driver's plugin modules (`raysys --plugin`): loaded here first, so a backend
    registered by a plugin is found in this worker too (its environment may predate the plugin)."""

    def __init__(
        self,
        loader: Callable[[], np.ndarray],
        offset: int,
        options: IndexOptions = IndexOptions(),
        backend: str = DEFAULT_BACKEND,
        plugins: Sequence[str] = (),
    ):
        load_plugins(list(plugins))
        cls = get_index(backend)
        x = loader()
        self.n, self.offset, self.dim, self.backend = len(x), int(offset), int(x.shape[1]), backend
        self.index = cls.build(x, options)
        del x

    def info(self) -> dict[str, Any]:
        inner = self.index.info()
        return {**inner, "backend": self.backend, "n": self.n, "offset": self.offset, "dim": self.dim,
                "gpu": bool(inner.get("gpu", False))}  # fmt: skip

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.n)
        D, ix = self.index.search(np.array(q, dtype=np.float32, order="C"), kk)
        return D, np.where(ix >= 0, ix + self.offset, -1)


def merge_topk(Ds: Sequence[np.ndarray], ixs: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact global top-k from per-shard top-k: score descending, then global row ascending."""
    D = np.concatenate(Ds, axis=1).astype(np.float32, copy=False)
    ix = np.concatenate(ixs, axis=1).astype(np.int64, copy=False)
    D = np.where(ix < 0, -np.inf, D)
    order = np.lexsort((ix, -D), axis=-1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(ix, order, 1)


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges; never an empty shard."""
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class ShardedIndex:
    """Driver-side handle: one `ShardIndex` actor per shard, parallel search, exact merge.

    `options.threads` 0 means cluster CPUs / shards; shard s builds with seed `options.seed + s`;
    `gpu` reserves a share of the cluster's GPUs for the shards (and tells their indexes so)."""

    def __init__(
        self,
        loaders: Sequence[Callable[[], np.ndarray]],
        ranges: Sequence[tuple[int, int]],
        options: IndexOptions = IndexOptions(),
        backend: str = DEFAULT_BACKEND,
        cpus_per_shard: float = 0.25,
        gpu: bool = True,
    ):
        import ray  # lazy: ~1 s that importers of the configs (raysys.experiments.pipeline) need not pay

        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0))
        num_gpus = min(1.0, gpus / len(loaders)) if gpu and gpus > 0 else 0.0
        threads = options.threads or max(1, int(res.get("CPU", 1)) // len(loaders))
        plugins = load_plugins()  # the driver's plugins (--plugin / RAYSYS_PLUGINS), for the actors to load
        actor = ray.remote(ShardIndex)
        self.actors = [
            actor.options(num_cpus=cpus_per_shard, num_gpus=num_gpus).remote(
                loader, lo, replace(options, seed=options.seed + s, threads=threads, gpu=num_gpus > 0), backend, plugins
            )
            for s, (loader, (lo, _hi)) in enumerate(zip(loaders, ranges))
        ]
        try:
            self.info = ray.get([a.info.remote() for a in self.actors])  # waits for every build
        except Exception:
            self.close()
            raise
        self.n = sum(i["n"] for i in self.info)

    def search(self, queries: np.ndarray, k: int, batch: int = 4096, window: int = 2,
               on_batch: Callable[[int], Any] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-k (scores, global rows) of every query; `window` batches in flight overlap transfer and
        search. `on_batch(n)` after each batch of n queries is merged (a progress bar)."""
        import ray  # lazy: ~1 s that importers of the configs (raysys.experiments.pipeline) need not pay

        nq = len(queries)
        k_eff = min(k, self.n)
        D = np.empty((nq, k_eff), np.float32)
        ix = np.empty((nq, k_eff), np.int64)
        flight: deque = deque()

        def drain() -> None:
            lo, hi, futs = flight.popleft()
            out = ray.get(futs)
            D[lo:hi], ix[lo:hi] = merge_topk([o[0] for o in out], [o[1] for o in out], k_eff)
            if on_batch is not None:
                on_batch(hi - lo)

        for lo in range(0, nq, batch):
            hi = min(nq, lo + batch)
            ref = ray.put(np.ascontiguousarray(queries[lo:hi], dtype=np.float32))
            flight.append((lo, hi, [a.search.remote(ref, k_eff) for a in self.actors]))
            if len(flight) >= window:
                drain()
        while flight:
            drain()
        return D, ix

    def close(self) -> None:
        import ray  # lazy: ~1 s that importers of the configs (raysys.experiments.pipeline) need not pay

        for a in self.actors:
            ray.kill(a)
        self.actors = []


# ---------------------------------------------------------------- the stage


def pairs_table(image_ids: pa.Array, text_ids: pa.Array, D: np.ndarray, ix: np.ndarray) -> pa.Table:
    n, k = ix.shape
    valid = (ix >= 0).ravel()
    img = np.repeat(np.arange(n), k)[valid]
    return pa.table(
        {
            "image_id": image_ids.take(pa.array(img)),
            "text_id": text_ids.take(pa.array(ix.ravel()[valid])),
            "rank": pa.array(np.tile(np.arange(k, dtype=np.int16), n)[valid], pa.int16()),
            "score": pa.array(D.ravel()[valid].astype(np.float32), pa.float32()),
        },
        schema=PAIRS_SCHEMA,
    )


def read_pairs(data: str | Path, k: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The weakly aligned corpus at K: stored top-max(K) pairs filtered to `rank < k`."""
    cols = None if columns is None else list(dict.fromkeys([*columns, "rank"]))
    t = read_table(data, "pairs", cols)
    if k is not None:
        t = t.filter(pc.less(t.column("rank"), k))
    return t.select(list(columns)) if columns is not None else t


def _ids(files: Sequence[Path]) -> pa.Array:
    return pa.concat_arrays([pq.read_table(f, columns=["id"]).column(0).combine_chunks() for f in files])


def _pairs_plan(data: Path, cfg: RetrievalConfig, img_files: list[Path], txt_files: list[Path]) -> tuple[int, list[int]]:
    """(K to search, pending image shards), reusing stored pairs made with the same parameters."""
    params = {
        "index": cfg.index,
        "nprobe": cfg.nprobe,
        "shards": cfg.shards,
        "train_size": cfg.train_size,
        "seed": cfg.seed,
        "model": model_id(cfg.embed.model),
        "query": cfg.embed.query,
        "images": fingerprint(img_files),
        "texts": fingerprint(txt_files),
    }
    if cfg.backend != DEFAULT_BACKEND:  # only then: pairs stored before backends existed stay valid
        params["backend"] = cfg.backend
    out = data / "pairs"
    meta_path = out / "_meta.json"
    old = None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = None
    if old and old.get("params") == params and int(old.get("k", 0)) >= cfg.k:
        k = int(old["k"])
    else:
        k = cfg.k
        if out.exists():
            for f in out.glob("*.parquet"):
                f.unlink()
        write_text_atomic(meta_path, json.dumps({"params": params, "k": k}))
    pending = [i for i in range(len(img_files)) if not (out / shard_name(i)).exists()]
    return k, pending


def _search_shards(data: Path, cfg: RetrievalConfig, img_files: list[Path], txt_files: list[Path], pending: list[int],
                   k: int, on_shard: Callable[[Path], None] | None) -> list[dict[str, Any]]:  # fmt: skip
    """Build the sharded index, write the pending pairs shards; return the shards' index info."""
    ensure_ray()
    text_ids = _ids(txt_files)
    ranges = shard_ranges(len(text_ids), cfg.shards)
    loaders = [partial(read_vectors, txt_files, lo, hi) for lo, hi in ranges]
    queries = sum(pq.read_metadata(img_files[i]).num_rows for i in pending)
    index = ShardedIndex(loaders, ranges, cfg.index_options(), cfg.backend, cfg.cpus_per_shard, cfg.gpu)
    try:
        with progress.bar(total=queries, desc="retrieve", unit="img") as bar:
            for i in pending:
                f = img_files[i]
                ids = pq.read_table(f, columns=["id"]).column(0).combine_chunks()
                if len(ids):
                    D, ix = index.search(read_vectors([f]), k, cfg.query_batch, on_batch=bar.update)
                else:  # every image of this shard was untagged: an empty pairs shard
                    D, ix = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
                path = data / "pairs" / shard_name(i)
                write_parquet_atomic(pairs_table(ids, text_ids, D, ix), path)
                log.info("retrieved pairs shard %d/%d", i + 1, len(img_files))
                if on_shard is not None:
                    on_shard(path)
    finally:
        index.close()
    return index.info


def _warn_k(k: int, n_texts: int, log_it: bool = True) -> str | None:
    """K above the corpus size is not an error (every text is retrieved) but is rarely meant."""
    if not n_texts or k <= n_texts:
        return None
    msg = f"retrieval.k={k} but the corpus holds {n_texts} texts: {n_texts} stored per image"
    if log_it:
        log.warning(msg)
    return msg


def retrieve(
    data: str | Path, cfg: RetrievalConfig | None = None, on_shard: Callable[[Path], None] | None = None,
    encoder: Encoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Embed, search, write `pairs/` and the diagnostics; return the diagnostics report.

    `encoder`: embeds the images and texts instead of the sentence encoder (`embed`), e.g. a
    two-stage checkpoint's towers for a second round (`raysys.evaluate.towers.TowerEncoder`); its
    `model_id` names the embeddings and the pairs, so switching encoders recomputes both."""
    cfg = cfg or RetrievalConfig()
    if encoder is not None:
        cfg = replace(cfg, embed=replace(cfg.embed, model=encoder.model_id))
    cfg.check()
    data = Path(data)
    _warn_k(cfg.k, count_rows(data, "texts"))
    t0 = time.perf_counter()
    emb = encoder(data, on_shard) if encoder is not None else embed(data, cfg.embed, ("images", "texts"), on_shard)
    t_embed = time.perf_counter() - t0
    img_files = shard_files(data / "embeddings", "images")
    txt_files = shard_files(data / "embeddings", "texts")
    n_texts = sum(pq.ParquetFile(f).metadata.num_rows for f in txt_files)
    dim = pq.read_schema(txt_files[0]).field("vector").type.list_size
    check_index(cfg.backend, dim, min(hi - lo for lo, hi in shard_ranges(n_texts, cfg.shards)), cfg.index_options())
    k_search, pending = _pairs_plan(data, cfg, img_files, txt_files)
    t1 = time.perf_counter()
    index_info = _search_shards(data, cfg, img_files, txt_files, pending, k_search, on_shard) if pending else []
    t_search = time.perf_counter() - t1
    n_pairs = sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(data, "pairs"))
    if n_pairs == 0:
        raise ContractError(data / "pairs", None, "pairs", "retrieval produced no pairs")
    report = retrieval_diagnostics(data, cfg.k, seed=cfg.seed, examples=cfg.examples, max_images=cfg.diag_images,
                                   query=cfg.embed.query)  # fmt: skip
    report.update(
        {
            "k_stored": min(k_search, n_texts),  # the K actually stored: a corpus smaller than K caps it
            "pairs": n_pairs,
            "pairs_at_k": int(sum(pc.sum(pc.less(pq.read_table(f, columns=["rank"]).column(0), cfg.k)).as_py() or 0
                                  for f in shard_files(data, "pairs"))),
            "backend": cfg.backend,
            "index": cfg.index,
            "nprobe": cfg.nprobe,
            "shards": len(index_info) if index_info else cfg.shards,
            "gpu_index": any(i.get("gpu") for i in index_info),
            "pairs_shards": len(img_files),
            "pairs_shards_computed": len(pending),
            "embed": emb,
            "seconds_embed": round(t_embed, 2),
            "seconds_search": round(t_search, 2),
        }
    )
    if cfg.k > n_texts:
        report["warnings"] = [_warn_k(cfg.k, n_texts, log_it=False)]
    write_report(data, "retrieval", report)
    update_manifest(
        data, "retrieval", counts={"pairs": n_pairs},
        provenance={"k": cfg.k, "k_stored": k_search, "index": cfg.index, "shards": cfg.shards, "model": model_id(cfg.embed.model)},
    )  # fmt: skip
    return report
