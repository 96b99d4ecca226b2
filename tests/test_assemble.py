"""Training examples (`raysys assemble`): one row per image, what `load_corpus` holds, resume,
determinism, bad input. Real retrieval and phrases on the demo world, through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _retrieval_fixtures import reshard

from raysys import cli
from raysys.contract import ContractError, read_manifest, read_table, shard_files, shard_name
from raysys.corpus.assemble import AssembleConfig, assemble, check_examples, iter_examples
from raysys.pretrain.config import PretrainConfig
from raysys.pretrain.granularities import Link, load_corpus
from raysys.pretrain.model import location_features


@pytest.fixture(scope="module")
def assembled(ray_session, small_world, tmp_path_factory) -> Path:
    """The 200-image world in 4 images shards, retrieved at K=5, phrases, assembled — all by the CLI."""
    data = reshard(small_world, tmp_path_factory.mktemp("assemble") / "data")
    for argv in (["retrieve", "--data", str(data), "--k", "5"], ["phrases", "--data", str(data)],
                 ["assemble", "--data", str(data)]):  # fmt: skip
        assert cli.main(argv) == 0
    return data


def _tables(data: Path) -> list[pa.Table]:
    return [pq.read_table(f) for f in shard_files(data, "examples")]


def test_one_row_per_image_features_stored_once(assembled):
    data = assembled
    images = [pq.read_table(f) for f in shard_files(data, "images")]
    examples = _tables(data)
    assert [f.name for f in shard_files(data, "examples")] == [shard_name(i) for i in range(4)]
    for img, ex in zip(images, examples):  # image-major, in images-table order
        assert ex.column("image_id").to_pylist() == img.column("image_id").to_pylist()
        assert ex.column("features").equals(img.column("features"))
        assert ex.column("features").nbytes == img.column("features").nbytes  # once per image, not K times
    ks = {len(v) for t in examples for v in t.column("text_id").to_pylist()}
    assert ks <= {0, 5} and 5 in ks
    disk = sum(f.stat().st_size for f in shard_files(data, "examples"))
    assert disk < 1.5 * sum(f.stat().st_size for f in shard_files(data, "images"))
    man = read_manifest(data)
    assert man["examples"]["k"] == 5 and man["examples"]["shards"] == 4
    assert man["examples"]["rows"] == man["counts"]["examples"] == sum(t.num_rows for t in images)
    assert check_examples(data)["rows"] == 200


def test_examples_hold_what_load_corpus_holds(assembled):
    """Per image: regions, features, tags, class ids, retrieved texts (rank < k) with their texts
    and phrase links, and the random_pairs text — equal to `load_corpus`'s for the same config."""
    data = assembled
    cfg = PretrainConfig(k=3, max_regions=6)
    corpus = load_corpus(data, cfg, {"pairs", "phrases", "random_pairs"})
    examples = [e for e in iter_examples(data, k=cfg.k, max_regions=cfg.max_regions) if not e.gold_eval]
    assert [e.image_id for e in examples] == corpus.image_ids
    n_links = 0
    for n, e in enumerate(examples):
        sl = corpus.regions(n)
        assert np.array_equal(e.features, corpus.features[sl])
        assert np.array_equal(location_features(e.boxes, e.width, e.height), corpus.loc[sl])
        assert np.array_equal(e.class_ids, corpus.class_ids[sl]) and e.tags == corpus.tags[sl]
        assert e.class_probs is None and corpus.class_probs is None
        idx = np.flatnonzero(corpus.pair_image == n)
        assert e.text_ids == [corpus.pair_text[j] for j in idx]
        assert e.texts == [corpus.texts[corpus.pair_text[j]] for j in idx]
        assert np.array_equal(e.ranks, corpus.pair_rank[idx]) and np.array_equal(e.scores, corpus.pair_score[idx])
        assert [[Link(*lk) for lk in links] for links in e.links] == [corpus.links[j] for j in idx]
        n_links += sum(len(x) for x in e.links)
        assert corpus.paired[n] == (n, e.random_text_id)
        assert e.random_text == corpus.texts[e.random_text_id]
    assert n_links > 100 and max(max(e.ranks, default=0) for e in examples) == 2
    gold = read_table(data, "gold")
    first = examples[0]
    assert first.gold_text_ids == sorted(t for i, t in zip(gold.column("image_id").to_pylist(),
                                                           gold.column("text_id").to_pylist()) if i == first.image_id)  # fmt: skip
    assert first.gold_text_ids and len(first.gold_texts) == len(first.gold_text_ids)


def test_resume_rewrites_only_the_missing_shard_and_runs_are_identical(assembled, tmp_path):
    data = assembled
    before = {f.name: f.read_bytes() for f in shard_files(data, "examples")}
    mtimes = {f.name: f.stat().st_mtime_ns for f in shard_files(data, "examples")}
    (data / "examples" / shard_name(2)).unlink()
    rep = assemble(data, AssembleConfig())
    assert rep["shards_computed"] == 1 and rep["shards"] == 4
    after = {f.name: f for f in shard_files(data, "examples")}
    assert {n: after[n].stat().st_mtime_ns for n in mtimes if n != shard_name(2)} == \
        {n: t for n, t in mtimes.items() if n != shard_name(2)}  # fmt: skip
    assert {n: f.read_bytes() for n, f in after.items()} == before
    # a second, independent run from the same inputs and seed: the same bytes
    other = tmp_path / "data"
    shutil.copytree(data, other, ignore=shutil.ignore_patterns("examples", "embeddings"))
    assert assemble(other, AssembleConfig())["shards_computed"] == 4
    assert {f.name: f.read_bytes() for f in shard_files(other, "examples")} == before
    # another seed: other random texts, so every shard is redone
    rep = assemble(other, AssembleConfig(seed=1))
    assert rep["shards_computed"] == 4
    a = pa.concat_tables(_tables(data)).column("random_text_id").to_pylist()
    b = pa.concat_tables(_tables(other)).column("random_text_id").to_pylist()
    assert a != b


def _copy(data: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(data / "manifest.json", dst / "manifest.json")
    shutil.copytree(data / "examples", dst / "examples")
    return dst


def test_bad_examples_fail_with_one_line_naming_file_and_field(assembled, tmp_path, capsys):
    missing = _copy(assembled, tmp_path / "missing")
    (missing / "examples" / shard_name(1)).unlink()
    with pytest.raises(ContractError) as e:
        check_examples(missing)
    assert e.value.field == "examples" and shard_name(1) in str(e.value) and "4 shards" in str(e.value)

    truncated = _copy(assembled, tmp_path / "truncated")
    f = truncated / "examples" / shard_name(0)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ContractError) as e:
        check_examples(truncated)
    assert e.value.field == "file" and shard_name(0) in str(e.value) and "truncated" in str(e.value)

    wrong = _copy(assembled, tmp_path / "wrong")
    f = wrong / "examples" / shard_name(3)
    t = pq.read_table(f)
    t = t.set_column(t.schema.get_field_index("rank"), "rank", t.column("rank").cast(pa.list_(pa.int64())))
    pq.write_table(t, f)
    with pytest.raises(ContractError) as e:
        check_examples(wrong)
    assert e.value.field == "rank" and shard_name(3) in str(e.value)
    pq.write_table(pq.read_table(assembled / "examples" / shard_name(3)).drop_columns(["links"]), f)
    with pytest.raises(ContractError, match="field 'links': missing column"):
        check_examples(wrong)

    capsys.readouterr()
    assert cli.main(["assemble", "--data", str(truncated), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard_name(0) in err[0] and "field 'file'" in err[0]
    assert cli.main(["assemble", "--data", str(assembled), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 200


def test_assemble_needs_its_inputs(tmp_path, small_world):
    with pytest.raises(ContractError, match="raysys retrieve"):
        assemble(small_world, AssembleConfig())
    with pytest.raises(ContractError, match="raysys assemble"):
        check_examples(small_world)


def test_without_phrases_strict_fails_and_lenient_writes_no_links(assembled, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assembled, data, ignore=shutil.ignore_patterns("examples", "embeddings", "phrases"))
    with pytest.raises(ContractError, match="raysys phrases"):
        assemble(data, AssembleConfig())
    rep = assemble(data, AssembleConfig(strict=False))
    assert rep["links"] is False and rep["rows"] == 200
    t = pa.concat_tables(_tables(data))
    assert all(not lk for per_image in t.column("links").to_pylist() for lk in per_image)
    assert t.column("text_id").equals(pa.concat_tables(_tables(assembled)).column("text_id"))
