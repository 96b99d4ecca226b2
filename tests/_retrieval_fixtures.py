"""The demo world with real retrieval done once per test session, shared by the retrieval and
phrase tests (a retrieval pass starts an embedding actor pool: ~15 s that need not be paid twice).

Used from module-scoped fixtures: `retrieved_world(small_world, tmp_path_factory)`. Tests may add
tables (phrases/) or re-run retrieval with a smaller K, but must not change pairs/ or embeddings/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raysys.contract import read_table, shard_files, shard_name, write_parquet_atomic

_CACHE: dict[str, tuple[Path, dict]] = {}
CONFIG = {"k": 5, "shards": 3}


def reshard(src: Path, dst: Path, image_shards: int = 4, text_shards: int = 2) -> Path:
    """Copy a world's inputs (images, texts, gold, manifest) split into more shards, so that
    resuming has several shards to skip or redo."""
    dst.mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    shutil.copytree(src / "gold", dst / "gold")
    for table, n in (("images", image_shards), ("texts", text_shards)):
        t = read_table(src, table)
        t = t.replace_schema_metadata(pq.read_schema(shard_files(src, table)[0]).metadata)
        bounds = np.linspace(0, t.num_rows, n + 1).round().astype(int)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            write_parquet_atomic(t.slice(a, b - a), dst / table / shard_name(i))
    return dst


def retrieved_world(small_world: Path, tmp_path_factory) -> tuple[Path, dict]:
    """(data dir, retrieval report) of the resharded session world, retrieved at K=5 on 3 shards."""
    key = str(small_world)
    if key not in _CACHE:
        from raysys.corpus.retrieval import RetrievalConfig, retrieve

        data = reshard(small_world, tmp_path_factory.mktemp("retrieved") / "data")
        _CACHE[key] = (data, retrieve(data, RetrievalConfig(**CONFIG)))
    return _CACHE[key]
