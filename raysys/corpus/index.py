"""The index seam of retrieval: one shard's vectors in an inner-product top-K index, by backend name.

Retrieval (`raysys.corpus.retrieval`) shards the text embeddings over Ray actors; each actor builds
one index over its rows and answers top-K queries. What that index is stays behind a small
protocol, so FAISS is one backend among others rather than a dependency of the sharding:

* `VectorIndex.build(x, options)` → an index over the rows of `x` (unit-norm float32, so inner
  product = cosine); `search(q, k)` → (scores, *local* rows), scores descending, -1 rows where
  fewer than `k` exist; `info()` → a dict (`backend`, `factory`, `ntotal`, `gpu`, …) for the report.
  An optional classmethod `check(dim, shard_rows, options)` rejects bad options before any actor
  starts (raise `ConfigError`).
* `@register_index("name")` registers a backend class; `retrieval.backend: name` selects it
  (default `faiss`). A backend from outside the package lives in a plugin module
  (`raysys --plugin MODULE_OR_FILE`, `raysys.plugins`): the shard actors load the driver's plugins
  before they look the name up, so the same registration happens in every worker.

The FAISS backend (`faiss`) reads `options.factory` as a `faiss.index_factory` string (`Flat`:
exact; `IVF…`, `PQ…`, `HNSW…` are trained on a seeded sample of the shard) and moves the index
to a GPU when the shard holds one and faiss-gpu sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raysys.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexOptions:
    """What a backend builds one shard's index with: the retrieval config's settings, per shard."""

    factory: str = "Flat"  # FAISS: an index_factory string; other backends may read or ignore it
    nprobe: int = 16  # IVF lists probed per query (efSearch for HNSW)
    train_size: int = 100_000  # training sample for indexes that need training
    seed: int = 0  # that sample's seed
    threads: int = 0  # search threads of this shard; 0 = the backend's default
    gpu: bool = False  # a GPU is reserved for this shard: use it if the backend can


@runtime_checkable
class VectorIndex(Protocol):
    """An inner-product top-K index over one shard's rows (see the module doc)."""

    @classmethod
    def build(cls, x: np.ndarray, options: IndexOptions) -> VectorIndex: ...

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


INDEX_BACKENDS: dict[str, type[VectorIndex]] = {}


def register_index(name: str) -> Callable[[type], type]:
    """Class decorator: make a `VectorIndex` selectable as `retrieval.backend: name`.

    Registering a name again replaces the earlier class (a plugin may override a backend, and a
    plugin file imported twice under two module names must not fail)."""

    def deco(cls: type) -> type:
        INDEX_BACKENDS[name] = cls
        return cls

    return deco


def get_index(name: str) -> type[VectorIndex]:
    try:
        return INDEX_BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"retrieval.backend: unknown index backend {name!r}; registered: {sorted(INDEX_BACKENDS)} "
            "(a backend from a plugin needs `raysys --plugin MODULE_OR_FILE`)"
        ) from None


def check_index(name: str, dim: int, shard_rows: int, options: IndexOptions) -> None:
    """Reject an unknown backend or options it cannot build, before any actor starts."""
    check = getattr(get_index(name), "check", None)
    if check is not None:
        check(dim, shard_rows, options)


# ---------------------------------------------------------------- the FAISS backend


# A dimension divisible by every usual PQ/OPQ sub-quantizer count: a factory string that fails to
# parse at this dimension is wrong at any (the exact dimension is checked again after embedding).
PARSE_DIM = 2**8 * 3 * 5 * 7


def check_factory_string(factory: str) -> None:
    """Refuse a string `faiss.index_factory` cannot parse, while the config is read (and under
    --dry-run): no embedding is computed for a run whose index cannot be built."""
    import faiss  # lazy: 0.5 s that importers of the configs, and other backends, need not pay

    if not isinstance(factory, str) or not factory.strip():
        raise ConfigError(f"retrieval.index: {factory!r} is not a FAISS index_factory string")
    try:
        faiss.index_factory(PARSE_DIM, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]  # drop faiss's C++ source location
        raise ConfigError(f"retrieval.index: {factory!r} is not a FAISS index_factory string ({why})") from None


def check_factory(factory: str, dim: int, shard_rows: int) -> None:
    """Reject a bad index string, or an IVF with more lists than a shard has vectors, before any actor starts."""
    import faiss  # lazy: 0.5 s that importers of the configs, and other backends, need not pay

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"retrieval.index: {factory!r} is not a FAISS index_factory string ({str(e).strip().splitlines()[-1]})") from None
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return
    if nlist > shard_rows:
        raise ConfigError(
            f"retrieval.index: {factory!r} has {nlist} lists but a shard holds only {shard_rows} vectors; "
            "use fewer lists or fewer shards"
        )


def set_search_params(index: Any, nprobe: int) -> None:
    """nprobe for IVF indexes (also inside wrappers), efSearch for HNSW; nothing for flat ones."""
    import faiss  # lazy: 0.5 s that importers of the configs, and other backends, need not pay

    ps = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", max(nprobe, 16))):
        try:
            ps.set_index_parameter(index, name, value)
            return
        except RuntimeError:
            continue


def build_index(x: np.ndarray, factory: str = "Flat", nprobe: int = 16, train_size: int = 100_000, seed: int = 0) -> Any:
    """An inner-product FAISS index over the rows of `x`, trained on a seeded sample if it needs it."""
    import faiss  # lazy: 0.5 s that importers of the configs, and other backends, need not pay

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"retrieval.index: {factory!r} is not a FAISS index_factory string ({str(e).strip().splitlines()[-1]})") from None
    if not index.is_trained:
        n = len(x)
        sample = x if n <= train_size else x[np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise ValueError(f"index {factory!r} could not be trained on {len(sample)} vectors of this shard: {msg}") from None
    index.add(x)
    set_search_params(index, nprobe)
    return index


@register_index("faiss")
class FaissIndex:
    """`faiss.index_factory(d, options.factory, METRIC_INNER_PRODUCT)`, on a GPU when one is reserved and usable."""

    def __init__(self, index: Any, factory: str, res: Any = None):
        self.faiss, self.factory, self.res = index, factory, res  # `res`: the GPU resources, kept alive

    @classmethod
    def check(cls, dim: int, shard_rows: int, options: IndexOptions) -> None:
        check_factory(options.factory, dim, shard_rows)

    @classmethod
    def build(cls, x: np.ndarray, options: IndexOptions) -> FaissIndex:
        import faiss  # lazy: 0.5 s that importers of the configs, and other backends, need not pay

        if options.threads > 0:
            faiss.omp_set_num_threads(options.threads)
        index = build_index(x, options.factory, options.nprobe, options.train_size, options.seed)
        if options.gpu and faiss.get_num_gpus() > 0:  # faiss-gpu on a CPU box returns unusable indexes
            try:
                res = faiss.StandardGpuResources()
                gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
                set_search_params(gpu_index, options.nprobe)
                return cls(gpu_index, options.factory, res)
            except RuntimeError as e:  # e.g. HNSW has no GPU implementation: stay on CPU
                log.warning("index %r stays on CPU: %s", options.factory, str(e).strip().splitlines()[-1])
        return cls(index, options.factory)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.faiss.search(q, k)

    def info(self) -> dict[str, Any]:
        return {"backend": "faiss", "factory": self.factory, "ntotal": int(self.faiss.ntotal), "gpu": self.res is not None}
