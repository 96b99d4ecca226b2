"""Training examples (`raysys assemble`): what pre-training reads, image-major, one shard per images shard.

Today a pre-training worker opens every `images/` shard, the whole `pairs/`, `phrases/` and `texts/`
tables, and keeps its share in Python dicts (`raysys.pretrain.granularities.load_corpus`). This
stage joins them once, after `retrieve` and `phrases`, into `examples/part-i.parquet` (one per
`images/part-i`, which `pairs/part-i` and `phrases/part-i` cover): one row per image with

* the image's columns exactly as `images/` stores them (boxes, float16 features, tags, tag scores,
  class ids, class_probs when present): features are stored once per image, never K times;
* its retrieved texts as parallel lists, all stored ranks (top-max(K); a reader keeps `rank < k`
  as `read_pairs` does), sorted by (rank, text_id) — `text_id`, `text` (inline, so a worker never
  needs the texts table), `rank`, `score` — and `links`: per text, its phrase links (phrase,
  char_start, char_end, region, link_score) sorted by (char_start, char_end, region), links to no
  region or to an empty span dropped, as `load_corpus` drops them;
* the other recipes' inputs: `random_text_id`/`random_text` (the `random_pairs` baseline: one
  seeded random text per eligible image, drawn with `load_corpus`'s rule so it is the same text for
  the same `seed`), `gold_text_id`/`gold_text`/`gold_split` (the image's true pairs, from which a
  reader draws `paired_ratio`'s seeded shuffle) and `gold_eval` (in the gold "eval" split).

Text-only rows for `round_robin` are the `texts/` table itself, read as it is: copying it would
add nothing. Shards are written under a hidden name and renamed; a re-run writes only the missing
ones, and all of them again when an input or a setting changed (`examples/_meta.json` fingerprints).
The same inputs and seed give the same shard contents.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys.contract import (
    EXAMPLES_VERSION,
    ContractError,
    examples_schema,
    read_manifest,
    read_table,
    region_arrays,
    shard_files,
    shard_name,
    update_manifest,
    write_parquet_atomic,
)
from raysys.corpus.embedding import META, fingerprint, reset_if_stale

log = logging.getLogger(__name__)

TABLE = "examples"


@dataclass
class AssembleConfig:
    """The training-examples stage (the `assemble` section of a pipeline config)."""

    seed: int = 0  # the `random_pairs` draw; the same as `pretrain.seed` gives load_corpus's texts
    k: int = 0  # keep retrieved texts with rank < k (0 = every stored rank; pretrain.k filters at read time)
    exclude_eval: bool = True  # as pretrain.exclude_eval: gold "eval" images get no random text
    strict: bool = True  # phrases/ must exist (False: assemble without links when it does not)
    row_group_images: int = 256  # Parquet row group: the unit a streamed window reads (raysys.pretrain.stream)


@dataclass
class Example:
    """One image as pre-training holds it: regions (truncated to `max_regions`), retrieved texts
    (rank < k) with their phrase links as `(char_start, char_end, region, score, phrase)` tuples
    (the fields of `raysys.pretrain.granularities.Link`, in order), random and gold texts."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (R, 4) float32
    features: np.ndarray  # (R, D) float16
    class_ids: np.ndarray  # (R,) int64
    tags: list[str]
    class_probs: np.ndarray | None
    gold_eval: bool
    text_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    links: list[list[tuple[int, int, int, float, str]]] = field(default_factory=list)
    random_text_id: str | None = None
    random_text: str | None = None
    gold_text_ids: list[str] = field(default_factory=list)
    gold_texts: list[str] = field(default_factory=list)
    gold_splits: list[str] = field(default_factory=list)


def stable_seed(*parts: Any) -> list[int]:
    """Seed material from ints and strings, the rule of `granularities._stable_seed` (Python's
    hash() differs per process: never use it)."""
    return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]


# ---------------------------------------------------------------- the stage


def assemble(data: str | Path, cfg: AssembleConfig | None = None) -> dict[str, Any]:
    """Write `examples/` (one shard per images shard; resumable); return the report."""
    cfg = cfg or AssembleConfig()
    root = Path(data)
    t0 = time.perf_counter()
    inputs = _inputs(root, cfg)
    out = root / TABLE
    reset_if_stale(out, _meta(inputs, cfg))
    k_stored = max((int(pc.max(pq.read_table(f, columns=["rank"]).column(0)).as_py() or 0) + 1
                    for f in inputs["pairs"] if pq.ParquetFile(f).metadata.num_rows), default=0)  # fmt: skip
    k = min(cfg.k, k_stored) if cfg.k else k_stored
    gold = _gold(root)
    random_text = _random_texts(root, inputs["images"], gold, cfg)
    pending = [i for i in range(len(inputs["images"])) if not (out / shard_name(i)).exists()]
    for i in pending:
        table = _shard(root, inputs, i, k, gold, random_text)
        write_parquet_atomic(table, out / shard_name(i), row_group_size=cfg.row_group_images)
        log.info("examples shard %d/%d: %d images", i + 1, len(inputs["images"]), table.num_rows)
    files = shard_files(root, TABLE)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    info = {"shards": len(files), "rows": rows, "k": k, "k_stored": k_stored, "seed": cfg.seed,
            "exclude_eval": cfg.exclude_eval, "links": bool(inputs["phrases"]), "schema_version": EXAMPLES_VERSION}  # fmt: skip
    update_manifest(root, "assemble", counts={TABLE: rows}, examples=info, provenance={"k": k, "seed": cfg.seed})
    return {**info, "shards_computed": len(pending), "seconds": round(time.perf_counter() - t0, 2)}


def ensure_examples(data: str | Path) -> bool:
    """Assemble when `examples/` was never made, or was made from other inputs (then again, with
    the settings it was made with): what `raysys pretrain` does before streaming. A shard that is
    missing or damaged while its inputs are unchanged is left for `check_examples` to refuse.
    True when it ran. Checking costs a stat per input shard."""
    root = Path(data)
    try:
        stored = json.loads((root / TABLE / META).read_text())
    except (OSError, json.JSONDecodeError):
        stored = {}
    cfg = AssembleConfig(seed=int(stored.get("seed", 0)), k=int(stored.get("k", 0)),
                         exclude_eval=bool(stored.get("exclude_eval", True)), strict=False)  # fmt: skip
    if read_manifest(root).get(TABLE) and stored == _meta(_inputs(root, cfg), cfg):
        return False
    log.info("assembling training examples in %s (raysys assemble)", root / TABLE)
    assemble(root, cfg)
    return True


def _inputs(root: Path, cfg: AssembleConfig) -> dict[str, list[Path]]:
    """The input shards, checked to line up: pairs/part-i (and phrases/part-i) cover images/part-i."""
    files = {t: shard_files(root, t) for t in ("images", "pairs", "phrases", "texts", "gold")}
    if not files["images"]:
        raise ContractError(root / "images", None, "images", "table is missing or empty")
    if not files["pairs"]:
        raise ContractError(root / "pairs", None, "pairs", "table is missing: run `raysys retrieve` first")
    if not files["phrases"] and cfg.strict:
        raise ContractError(root / "phrases", None, "phrases", "table is missing: run `raysys phrases` first")
    for t in ("pairs", "phrases"):
        names = [f.name for f in files[t]]
        if names and names != [shard_name(i) for i in range(len(files["images"]))]:
            raise ContractError(root / t, None, t, f"{len(names)} shards do not cover the {len(files['images'])} "
                                f"images shards: re-run `raysys {'retrieve' if t == 'pairs' else 'phrases'}`")  # fmt: skip
    if not files["texts"]:
        raise ContractError(root / "texts", None, "texts", "table is missing or empty")
    return files


def _meta(inputs: dict[str, list[Path]], cfg: AssembleConfig) -> dict[str, Any]:
    return {"version": EXAMPLES_VERSION, "seed": cfg.seed, "k": cfg.k, "exclude_eval": cfg.exclude_eval,
            **{t: fingerprint(fs) for t, fs in inputs.items()}}  # fmt: skip


def _gold(root: Path) -> pa.Table | None:
    return read_table(root, "gold", ["image_id", "text_id", "split"]) if shard_files(root, "gold") else None


def _random_texts(root: Path, images: list[Path], gold: pa.Table | None, cfg: AssembleConfig) -> dict[str, str]:
    """image id → its `random_pairs` text id: `load_corpus`'s draw over the eligible images (not in
    the gold "eval" split when `exclude_eval`) in table order, over the texts table's ids."""
    excluded: set[str] = set()
    if gold is not None and cfg.exclude_eval:
        excluded = set(pc.filter(gold.column("image_id"), pc.equal(gold.column("split"), "eval")).to_pylist())
    ids = [i for f in images for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    eligible = [i for i in ids if i not in excluded]
    text_ids = read_table(root, "texts", ["text_id"]).column("text_id").to_pylist()
    if not text_ids:
        raise ContractError(root / "texts", None, "texts", "text corpus is empty")
    draw = np.random.default_rng(stable_seed(cfg.seed, "random_pairs")).integers(0, len(text_ids), len(eligible))
    return {iid: text_ids[int(d)] for iid, d in zip(eligible, draw)}


def _shard(root: Path, inputs: dict[str, list[Path]], i: int, k: int, gold: pa.Table | None,
           random_text: dict[str, str]) -> pa.Table:  # fmt: skip
    """The examples of images shard i: its images' columns plus their texts, links, random and gold texts."""
    img = pq.read_table(inputs["images"][i])
    ids = img.column("image_id").to_pylist()
    n_regions = img.column("boxes").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    pairs = pq.read_table(inputs["pairs"][i], columns=["image_id", "text_id", "rank", "score"])
    pairs = pairs.filter(pc.less(pairs.column("rank"), k))
    by_image: dict[str, list[tuple[int, str, float]]] = {}
    for iid, tid, r, s in zip(*(pairs.column(c).to_pylist() for c in ("image_id", "text_id", "rank", "score"))):
        by_image.setdefault(iid, []).append((r, tid, s))
    regions = dict(zip(ids, n_regions.tolist()))
    links = _links(inputs["phrases"][i], regions) if inputs["phrases"] else {}
    golds = _gold_of(gold, set(ids))
    want = {t for ps in by_image.values() for _, t, _ in ps} | {random_text[j] for j in ids if j in random_text}
    want |= {t for g in golds.values() for t, _ in g}
    texts = _texts(root, want)
    cols: dict[str, list] = {c: [] for c in ("text_id", "text", "rank", "score", "links", "random_text_id", "random_text",
                                             "gold_text_id", "gold_text", "gold_split")}  # fmt: skip
    for iid in ids:
        ps = sorted(by_image.get(iid, []))
        cols["text_id"].append([t for _, t, _ in ps])
        cols["text"].append([texts[t] for _, t, _ in ps])
        cols["rank"].append([r for r, _, _ in ps])
        cols["score"].append([s for _, _, s in ps])
        cols["links"].append([links.get((iid, t), []) for _, t, _ in ps])
        rt = random_text.get(iid)
        cols["random_text_id"].append(rt)
        cols["random_text"].append(texts[rt] if rt is not None else None)
        g = golds.get(iid, [])
        cols["gold_text_id"].append([t for t, _ in g])
        cols["gold_text"].append([texts[t] for t, _ in g])
        cols["gold_split"].append([s for _, s in g])
    probs = img.schema.field("class_probs").type if "class_probs" in img.column_names else None
    dim = img.schema.field("features").type.value_type.list_size
    schema = examples_schema(dim, probs)
    out = {f.name: img.column(f.name) for f in schema if f.name in img.column_names}
    out["gold_eval"] = pa.array([any(s == "eval" for _, s in golds.get(j, [])) for j in ids], pa.bool_())
    for c, v in cols.items():
        out[c] = pa.array(v, schema.field(c).type)
    return pa.table(out, schema=schema)


def _links(path: Path, regions: dict[str, int]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(image, text) → its phrase links to an existing region with a non-empty span, in text order."""
    ph = pq.read_table(path)
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    cols = [ph.column(c).to_pylist() for c in ("image_id", "text_id", "phrase", "char_start", "char_end",
                                              "region", "link_score")]  # fmt: skip
    for iid, tid, phrase, cs, ce, reg, score in zip(*cols):
        if reg is None or reg < 0 or reg >= regions.get(iid, 0) or cs is None or ce is None or ce <= cs:
            continue
        out.setdefault((iid, tid), []).append({"phrase": phrase or "", "char_start": cs, "char_end": ce,
                                               "region": reg, "link_score": float(score or 0.0)})  # fmt: skip
    for v in out.values():
        v.sort(key=lambda lk: (lk["char_start"], lk["char_end"], lk["region"]))
    return out


def _gold_of(gold: pa.Table | None, ids: set[str]) -> dict[str, list[tuple[str, str]]]:
    """image → its (text_id, split) gold pairs, by text id."""
    if gold is None:
        return {}
    g = gold.filter(pc.is_in(gold.column("image_id"), value_set=pa.array(sorted(ids), pa.string())))
    out: dict[str, list[tuple[str, str]]] = {}
    for iid, tid, s in zip(*(g.column(c).to_pylist() for c in ("image_id", "text_id", "split"))):
        out.setdefault(iid, []).append((tid, s))
    for v in out.values():
        v.sort()
    return out


def _texts(root: Path, want: set[str]) -> dict[str, str]:
    """The texts of `want`, streamed from `texts/` (never the whole table in memory)."""
    found: dict[str, str] = {}
    value_set = pa.array(sorted(want), pa.string())
    for f in shard_files(root, "texts"):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["text_id", "text"]):
            t = pa.Table.from_batches([b])
            t = t.filter(pc.is_in(t.column("text_id"), value_set=value_set))
            found.update(zip(t.column("text_id").to_pylist(), t.column("text").to_pylist()))
    missing = want - found.keys()
    if missing:
        raise ContractError(root / "texts", None, "text_id", f"{len(missing)} referenced text ids not found, e.g. {sorted(missing)[0]}")
    return found


# ---------------------------------------------------------------- validation and reading


def check_examples(data: str | Path) -> dict[str, Any]:
    """Fail before training on a missing, truncated or wrong-schema examples shard: a ContractError
    whose one-line message names the file and the field. Returns the manifest's `examples` entry."""
    root = Path(data)
    man = read_manifest(root)
    info = man.get(TABLE)
    if not info:
        raise ContractError(root / TABLE, None, TABLE, "no training examples: run `raysys assemble` first")
    dim = int(man.get("feature_dim") or 0)
    rows = 0
    for i in range(int(info["shards"])):
        path = root / TABLE / shard_name(i)
        if not path.exists():
            raise ContractError(path, None, TABLE, f"shard missing: the manifest records {info['shards']} shards")
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise ContractError(path, None, "file", f"truncated or not Parquet ({str(e).splitlines()[0]})") from None
        _check_schema(path, meta.schema.to_arrow_schema(), dim)
        rows += meta.num_rows
    extra = [f.name for f in shard_files(root, TABLE) if f.name >= shard_name(int(info["shards"]))]
    if extra:
        raise ContractError(root / TABLE / extra[0], None, TABLE, f"not recorded: the manifest records {info['shards']} shards")
    if rows != int(info["rows"]):
        raise ContractError(root / TABLE, None, "rows", f"{rows} rows, the manifest records {info['rows']}")
    return info


def _check_schema(path: Path, schema: pa.Schema, dim: int) -> None:
    probs = schema.field("class_probs").type if "class_probs" in schema.names else None
    if "features" in schema.names and not dim:
        dim = schema.field("features").type.value_type.list_size
    for f in examples_schema(dim, probs):
        if f.name not in schema.names:
            raise ContractError(path, None, f.name, "missing column")
        if not schema.field(f.name).type.equals(f.type):
            raise ContractError(path, None, f.name, f"type {schema.field(f.name).type}, expected {f.type}")


def read_examples(data: str | Path, shard: int, columns: Sequence[str] | None = None) -> pa.Table:
    """One examples shard (e.g. a Ray Train worker's), optionally some columns only."""
    return pq.read_table(Path(data) / TABLE / shard_name(shard), columns=list(columns) if columns else None)


def iter_examples(
    data: str | Path, k: int | None = None, max_regions: int | None = None, shards: Sequence[int] | None = None,
    check: bool = True,
) -> Iterator[Example]:
    """Per image, in table order, what `load_corpus` holds for it: regions truncated to
    `max_regions`, retrieved texts with rank < k, their links to the kept regions. One shard in
    memory at a time. Validates the examples first (`check_examples`) unless `check=False`."""
    info = check_examples(data) if check else read_manifest(data).get(TABLE, {})
    for i in shards if shards is not None else range(int(info.get("shards", 0))):
        yield from table_examples(read_examples(data, i), k, max_regions)


def table_examples(t: pa.Table, k: int | None, max_regions: int | None) -> Iterator[Example]:
    """The `Example` of each row of an examples table (a shard, or a window's rows of one)."""
    arr = region_arrays(t)
    cls = np.asarray(t.column("class_ids").combine_chunks().values, dtype=np.int64)
    tags = t.column("tags").combine_chunks().values.to_pylist()
    probs = (np.asarray(t.column("class_probs").combine_chunks().values.values, np.float32).reshape(len(cls), -1)
             if "class_probs" in t.column_names else None)  # fmt: skip
    names = ("image_id", "width", "height", "gold_eval", "text_id", "text", "rank", "score", "links", "random_text_id",
             "random_text", "gold_text_id", "gold_text", "gold_split")  # fmt: skip
    for r, row in enumerate(zip(*(t.column(c).to_pylist() for c in names))):
        iid, w, h, ev, tids, txts, ranks, scores, links, rid, rtxt, gids, gtxts, gsplits = row
        lo, hi = int(arr["offsets"][r]), int(arr["offsets"][r + 1])
        if max_regions is not None:
            hi = min(hi, lo + max_regions)
        keep = [j for j, rk in enumerate(ranks) if k is None or rk < k]
        yield Example(
            iid, w, h, arr["boxes"][lo:hi], arr["features"][lo:hi], cls[lo:hi], tags[lo:hi],
            probs[lo:hi] if probs is not None else None, ev,
            text_ids=[tids[j] for j in keep], texts=[txts[j] for j in keep],
            ranks=np.array([ranks[j] for j in keep], np.int64), scores=np.array([scores[j] for j in keep], np.float32),
            links=[[(lk["char_start"], lk["char_end"], lk["region"], lk["link_score"], lk["phrase"])
                    for lk in links[j] if lk["region"] < hi - lo] for j in keep],
            random_text_id=rid, random_text=rtxt, gold_text_ids=gids, gold_texts=gtxts, gold_splits=gsplits,
        )  # fmt: skip
