"""The data contract: Parquet schemas, the dataset directory layout and its manifest, validation.

Every stage of raysys reads and writes a *dataset directory*::

    DIR/
      manifest.json        schema version, feature dim, tag vocabulary, counts, provenance
      images/*.parquet     one row per image, per-region lists (IMAGES_COLUMNS)
      texts/*.parquet      text_id, text, source
      pairs/*.parquet      image_id, text_id, rank, score   (the weakly aligned corpus R)
      phrases/*.parquet    noun phrases of retrieved sentences, linked to regions
      gold/*.parquet       true (image_id, text_id) pairs; read only by evaluation
      examples/*.parquet   one row per image with its retrieved texts: what pre-training reads
      embeddings/{images,texts}/*.parquet   normalised vectors searched by retrieval
      diagnostics/         JSON + Markdown reports of each stage

Stage boundaries are Parquet so that any stage can be re-run, inspected with pandas, or read by
Ray Data on another node. Files are written under a temporary name and renamed when complete, so a
crash never leaves a half-written shard that a re-run would mistake for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("images", "texts", "pairs", "phrases", "gold")
DEFAULT_FEATURE_DIM = 2048
# Boxes may overshoot the image by detector rounding; more than this is an error.
BOX_TOLERANCE_PX = 1.0


class ContractError(ValueError):
    """Bad input. The message is one line naming the file, the row and the field."""

    def __init__(self, file: str | os.PathLike, row: int | None, field: str, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = f"row {row}" if row is not None else "file"
        super().__init__(f"{file}: {where}: field '{field}': {problem}")

    def __reduce__(self):  # pickles through Ray (a task's error reaches the driver as itself)
        return (type(self), (self.file, self.row, self.field, self.problem))


# ---------------------------------------------------------------- schemas


def images_schema(dim: int = DEFAULT_FEATURE_DIM) -> pa.Schema:
    """Images table. Per-region values are parallel lists; features are float16 on disk."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy pixels
            ("features", pa.list_(pa.list_(pa.float16(), dim))),
            ("tags", pa.list_(pa.string())),
            ("tag_scores", pa.list_(pa.float32())),
            ("class_ids", pa.list_(pa.int32())),  # detector class id (index into manifest tag_vocab)
            ("source", pa.string()),
        ],
        metadata={"raysys.table": "images", "raysys.feature_dim": str(dim)},
    )


TEXTS_SCHEMA = pa.schema(
    [("text_id", pa.string()), ("text", pa.string()), ("source", pa.string())],
    metadata={"raysys.table": "texts"},
)
PAIRS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("text_id", pa.string()), ("rank", pa.int16()), ("score", pa.float32())],
    metadata={"raysys.table": "pairs"},
)
PHRASES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("text_id", pa.string()),
        ("phrase", pa.string()),
        ("char_start", pa.int32()),  # [start, end) in the text, for tokenizer offset mapping
        ("char_end", pa.int32()),
        ("region", pa.int32()),  # index into the image's region lists
        ("link_score", pa.float32()),
    ],
    metadata={"raysys.table": "phrases"},
)
GOLD_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("text_id", pa.string()), ("split", pa.string())],
    metadata={"raysys.table": "gold"},
)
IMAGES_COLUMNS = ("image_id", "width", "height", "boxes", "features", "tags", "tag_scores", "class_ids")
EXAMPLES_VERSION = 1
# A phrase of a retrieved sentence linked to a region of the image (one row of phrases/, per pair).
LINK_TYPE = pa.struct([("phrase", pa.string()), ("char_start", pa.int32()), ("char_end", pa.int32()),
                       ("region", pa.int32()), ("link_score", pa.float32())])  # fmt: skip


def examples_schema(dim: int = DEFAULT_FEATURE_DIM, class_probs: pa.DataType | None = None) -> pa.Schema:
    """Training examples (`raysys assemble`): one row per image, image-major. The image's columns
    are the images table's (features stored once); then its K retrieved texts as parallel lists
    (`links`: per text, its phrase links), a seeded random text, and its gold texts."""
    image = [f for f in images_schema(dim) if f.name != "source"]
    if class_probs is not None:
        image.append(pa.field("class_probs", class_probs))
    return pa.schema(
        image
        + [
            ("gold_eval", pa.bool_()),  # in the gold "eval" split: pre-training leaves it out
            ("text_id", pa.list_(pa.string())),  # retrieved texts, by (rank, text_id)
            ("text", pa.list_(pa.string())),
            ("rank", pa.list_(pa.int16())),
            ("score", pa.list_(pa.float32())),
            ("links", pa.list_(pa.list_(LINK_TYPE))),  # per retrieved text, by (char_start, char_end, region)
            ("random_text_id", pa.string()),  # the `random_pairs` baseline's text (null: not eligible)
            ("random_text", pa.string()),
            ("gold_text_id", pa.list_(pa.string())),  # true pairs, by text_id (gold/; empty without it)
            ("gold_text", pa.list_(pa.string())),
            ("gold_split", pa.list_(pa.string())),
        ],
        metadata={"raysys.table": "examples", "raysys.feature_dim": str(dim),
                  "raysys.examples_version": str(EXAMPLES_VERSION)},  # fmt: skip
    )


def schema_for(table: str, dim: int = DEFAULT_FEATURE_DIM) -> pa.Schema:
    return {
        "images": images_schema(dim),
        "texts": TEXTS_SCHEMA,
        "pairs": PAIRS_SCHEMA,
        "phrases": PHRASES_SCHEMA,
        "gold": GOLD_SCHEMA,
    }[table]


# ---------------------------------------------------------------- building images tables


@dataclass
class ImageRecord:
    """One image in memory, as importers and featurizers produce it."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (R, 4) float32 xyxy pixels
    features: np.ndarray  # (R, D) float
    tags: list[str]
    tag_scores: np.ndarray  # (R,)
    class_ids: np.ndarray  # (R,)
    source: str = ""


def images_table(records: list[ImageRecord], dim: int) -> pa.Table:
    """Pack records into an images table without per-value Python loops (features dominate)."""
    n_regions = np.array([len(r.boxes) for r in records], dtype=np.int32)
    offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(n_regions, out=offsets[1:])
    total = int(offsets[-1])
    feats = (
        np.concatenate([r.features for r in records]).astype(np.float16, copy=False)
        if total
        else np.zeros((0, dim), np.float16)
    )
    boxes = np.concatenate([r.boxes for r in records]).astype(np.float32) if total else np.zeros((0, 4), np.float32)
    scores = np.concatenate([r.tag_scores for r in records]).astype(np.float32) if total else np.zeros(0, np.float32)
    cids = np.concatenate([r.class_ids for r in records]).astype(np.int32) if total else np.zeros(0, np.int32)
    tags = [t for r in records for t in r.tags]
    off = pa.array(offsets)

    def nested(flat: np.ndarray, width: int) -> pa.Array:
        return pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width))

    cols = {
        "image_id": pa.array([r.image_id for r in records], pa.string()),
        "width": pa.array([r.width for r in records], pa.int32()),
        "height": pa.array([r.height for r in records], pa.int32()),
        "boxes": nested(boxes, 4),
        "features": nested(feats, dim),
        "tags": pa.ListArray.from_arrays(off, pa.array(tags, pa.string())),
        "tag_scores": pa.ListArray.from_arrays(off, pa.array(scores)),
        "class_ids": pa.ListArray.from_arrays(off, pa.array(cids)),
        "source": pa.array([r.source for r in records], pa.string()),
    }
    return pa.Table.from_pydict(cols, schema=images_schema(dim))


def region_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Flatten an images table to numpy: per-region arrays plus `offsets` (n_images + 1)."""
    feats = table.column("features").combine_chunks()
    boxes = table.column("boxes").combine_chunks()
    dim = feats.type.value_type.list_size
    out = {
        "offsets": np.asarray(feats.offsets),
        "features": np.asarray(feats.values.values).reshape(-1, dim),
        "boxes": np.asarray(boxes.values.values, dtype=np.float32).reshape(-1, 4),
    }
    if out["offsets"][0] != 0:  # a sliced table: rebase
        base = out["offsets"][0]
        out["features"] = out["features"][base : out["offsets"][-1]]
        out["boxes"] = out["boxes"][base : out["offsets"][-1]]
        out["offsets"] = out["offsets"] - base
    return out


# ---------------------------------------------------------------- validation


def validate_images(table: pa.Table, file: str | os.PathLike, dim: int, row_offset: int = 0) -> None:
    """Raise ContractError on the first bad row. Vectorised: runs at Parquet speed."""
    schema = table.schema
    for name in IMAGES_COLUMNS:
        if name not in schema.names:
            raise ContractError(file, None, name, "missing column")
    ftype = schema.field("features").type.value_type
    if pa.types.is_fixed_size_list(ftype) and ftype.list_size != dim:
        raise ContractError(file, row_offset, "features", f"feature dim {ftype.list_size}, expected {dim}")
    for i, n in enumerate(table.column("boxes").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)):
        if n == 0:
            raise ContractError(file, row_offset + i, "boxes", "image has no regions")
    arr = region_arrays(table)
    offsets = arr["offsets"]

    def row_of(region: int) -> int:
        return row_offset + int(np.searchsorted(offsets, region, side="right") - 1)

    feats = arr["features"]
    if feats.shape[1] != dim:
        raise ContractError(file, row_offset, "features", f"feature dim {feats.shape[1]}, expected {dim}")
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise ContractError(file, row_of(int(np.argmax(bad))), "features", "NaN or inf in region features")
    boxes = arr["boxes"]
    w = np.repeat(table.column("width").to_numpy(), np.diff(offsets))
    h = np.repeat(table.column("height").to_numpy(), np.diff(offsets))
    tol = BOX_TOLERANCE_PX
    bad = (
        ~np.isfinite(boxes).all(axis=1)
        | (boxes[:, 0] < -tol)
        | (boxes[:, 1] < -tol)
        | (boxes[:, 2] > w + tol)
        | (boxes[:, 3] > h + tol)
        | (boxes[:, 2] < boxes[:, 0])
        | (boxes[:, 3] < boxes[:, 1])
    )
    if bad.any():
        r = int(np.argmax(bad))
        i = row_of(r)
        raise ContractError(
            file, i, "boxes", f"box {boxes[r].tolist()} outside the {int(w[r])}x{int(h[r])} image"
        )
    for name in ("tags", "tag_scores", "class_ids"):
        lens = table.column(name).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        mismatch = lens != np.diff(offsets)
        if mismatch.any():
            raise ContractError(file, row_offset + int(np.argmax(mismatch)), name, "length differs from boxes")


def check_text(text: Any, file: str | os.PathLike, row: int, field: str = "text") -> str:
    """Decode and check one text value: must be valid UTF-8 and not blank."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ContractError(file, row, field, f"not valid UTF-8 (byte {e.start})") from None
    if text is None or not str(text).strip():
        raise ContractError(file, row, field, "empty text")
    if "\x00" in str(text):
        raise ContractError(file, row, field, f"text contains a NUL byte (character {str(text).index(chr(0))})")
    return str(text)


def check_ids(table: pa.Table, column: str, file: str | os.PathLike, row_offset: int = 0,
              seen: dict[str, tuple[str, int]] | None = None) -> None:  # fmt: skip
    """Ids are UTF-8, not blank, free of control characters and unique (`seen`: ids of the rows
    before, across shards, with where they were first seen)."""
    try:
        values = table.column(column).to_pylist()
    except UnicodeDecodeError as e:
        raise ContractError(file, None, column, f"an id is not valid UTF-8 (byte {e.start})") from None
    seen = {} if seen is None else seen
    for i, v in enumerate(values):
        row = row_offset + i
        if not isinstance(v, str) or not v.strip():
            raise ContractError(file, row, column, "empty id")
        bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ContractError(file, row, column, f"id contains the control character {bad!r}")
        first = seen.setdefault(v, (str(file), row))
        if first != (str(file), row):
            where = f"row {first[1]}" if first[0] == str(file) else f"{first[0]} row {first[1]}"
            raise ContractError(file, row, column, f"duplicate id {v!r} (first at {where})")


def validate_texts(table: pa.Table, file: str | os.PathLike, row_offset: int = 0,
                   seen: dict[str, tuple[str, int]] | None = None) -> None:  # fmt: skip
    for name in ("text_id", "text"):
        if name not in table.schema.names:
            raise ContractError(file, None, name, "missing column")
    check_ids(table, "text_id", file, row_offset, seen)
    try:
        values = table.column("text").to_pylist()
    except UnicodeDecodeError as e:
        raise ContractError(file, None, "text", f"a text is not valid UTF-8 (byte {e.start})") from None
    for i, t in enumerate(values):
        check_text(t, file, row_offset + i)


def validate_dataset(path: str | os.PathLike) -> dict[str, int]:
    """Validate every table of a dataset directory; return row counts per table."""
    root = Path(path)
    man = read_manifest(root)
    dim = int(man.get("feature_dim") or DEFAULT_FEATURE_DIM)
    counts: dict[str, int] = {}
    for table in TABLES:
        n = 0
        seen: dict[str, tuple[str, int]] = {}  # ids are unique per table, across its shards
        for f in shard_files(root, table):
            pf = pq.ParquetFile(f)
            row = 0  # rows are numbered per file, as in every other ContractError
            for batch in pf.iter_batches(batch_size=4096):
                t = pa.Table.from_batches([batch])
                if table == "images":
                    validate_images(t, f, dim, row)
                    check_ids(t, "image_id", f, row, seen)
                elif table == "texts":
                    validate_texts(t, f, row, seen)
                n += t.num_rows
                row += t.num_rows
        if n or (root / table).exists():
            counts[table] = n
    return counts


# ---------------------------------------------------------------- layout, manifest, atomic writes


def shard_files(root: str | os.PathLike, table: str) -> list[Path]:
    d = Path(root) / table
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith(".")) if d.is_dir() else []


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    p = Path(root) / MANIFEST
    if not p.exists():
        return {"schema_version": SCHEMA_VERSION, "feature_dim": None, "tag_vocab": [], "counts": {}, "provenance": []}
    man = json.loads(p.read_text())
    if man.get("schema_version", 0) > SCHEMA_VERSION:
        raise ContractError(p, None, "schema_version", f"{man['schema_version']} is newer than this raysys reads")
    return man


def update_manifest(root: str | os.PathLike, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into the manifest (counts are merged per table) and append a provenance entry."""
    root = Path(root)
    man = read_manifest(root)
    counts = fields.pop("counts", {})
    prov = fields.pop("provenance", {})
    man.update({k: v for k, v in fields.items() if v is not None})
    man["schema_version"] = SCHEMA_VERSION
    man.setdefault("counts", {}).update(counts)
    man.setdefault("provenance", []).append(
        {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **prov}
    )
    write_text_atomic(root / MANIFEST, json.dumps(man, indent=2, sort_keys=False))
    return man


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, **kw: Any) -> None:
    """Write one shard under a hidden temporary name, then rename: a shard exists only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    kw.setdefault("compression", "zstd")
    kw.setdefault("compression_level", 1)
    kw.setdefault("use_dictionary", dictionary_columns(table.schema))
    try:
        pq.write_table(table, tmp, **kw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: everything but float data (feature vectors would spend
    seconds per shard building a dictionary that is then abandoned)."""

    def leaf(t: pa.DataType) -> pa.DataType:
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        return t

    return [f.name for f in schema if not pa.types.is_floating(leaf(f.type))]


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


@contextmanager
def atomic_table_dir(root: str | os.PathLike, table: str) -> Iterator[Path]:
    """Yield a temporary directory for a whole table; it replaces `root/table` only on success.

    If `root` itself did not exist before and the block fails, `root` is removed too, so a failed
    import leaves no partial dataset directory behind.
    """
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{table}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        final = root / table
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise


@contextmanager
def atomic_dataset_dir(root: str | os.PathLike) -> Iterator[Path]:
    """Yield where to build a dataset directory; it appears at `root` only if the block succeeds.

    A new dataset is built in a hidden sibling and renamed at the end. An existing dataset (adding
    a table to it) is written in place, each table through `atomic_table_dir`.
    """
    root = Path(root)
    if root.exists():
        yield root
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Accumulate row batches and write fixed-size shards into a directory."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int = 8192, start: int = 0):
        self.dir, self.schema, self.rows_per_shard = Path(directory), schema, rows_per_shard
        self.index, self.rows, self._pending, self._n = start, 0, [], 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema) if table.schema != self.schema else table)
        self._n += table.num_rows
        self.rows += table.num_rows
        if self._n >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        t = pa.concat_tables(self._pending)
        write_parquet_atomic(t, self.dir / shard_name(self.index))
        self.index += 1
        self._pending, self._n = [], 0


def read_table(root: str | os.PathLike, table: str, columns: Iterable[str] | None = None) -> pa.Table:
    files = shard_files(root, table)
    if not files:
        raise ContractError(Path(root) / table, None, table, "table is missing or empty")
    cols = list(columns) if columns is not None else None
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files], promote_options="default")


def iter_table(root: str | os.PathLike, table: str, batch_size: int = 1024, columns: Iterable[str] | None = None):
    """Stream record batches of a table, shard by shard, so inputs larger than RAM work."""
    cols = list(columns) if columns is not None else None
    for f in shard_files(root, table):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols)


def count_rows(root: str | os.PathLike, table: str) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(root, table))
