"""Weakly aligned corpus: embedding on Ray Data, sharded FAISS top-K, diagnostics, resume, bad input.

Real parts throughout: the packaged MiniLM, FAISS, Ray Data actor pools on the session Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _retrieval_fixtures import CONFIG, reshard, retrieved_world

from raysys.contract import (
    TEXTS_SCHEMA,
    ContractError,
    ImageRecord,
    images_table,
    shard_files,
    shard_name,
    write_parquet_atomic,
)
from raysys.corpus.embedding import EmbedConfig, distinct_tags, query_string
from raysys.corpus.index import IndexOptions
from raysys.corpus.retrieval import (
    RetrievalConfig,
    ShardIndex,
    merge_topk,
    read_pairs,
    retrieve,
    shard_ranges,
)

ROOT = Path(__file__).resolve().parents[1]


class SimulatedCrash(RuntimeError):
    pass


def crash_after(n: int, written: list[Path]):
    """on_shard hook: record each finished shard; die like a killed process after the n-th."""

    def hook(path: Path) -> None:
        written.append(path)
        if len(written) >= n:
            raise SimulatedCrash(f"crash after {n} shards")

    return hook


@pytest.fixture(scope="module")
def world_run(small_world, tmp_path_factory, ray_session) -> tuple[Path, dict]:
    return retrieved_world(small_world, tmp_path_factory)


@pytest.fixture(scope="module")
def world(world_run) -> Path:
    return world_run[0]


@pytest.fixture(scope="module")
def retrieved(world_run) -> dict:
    return world_run[1]


# ---------------------------------------------------------------- units (no Ray)


def test_query_string_orders_by_score_and_optionally_dedups():
    from raysys.config import ConfigError

    tags = ["Bottle", "plant", "bottle ", "table", "Plant", "wall"]
    scores = [0.5, 0.9, 0.95, 0.2, 0.1, 0.2]
    # default: one tag per region (a class's count is its weight), surest first, ties in region order
    assert query_string(tags, scores) == "bottle plant bottle table wall plant"
    assert distinct_tags(tags, scores) == ["bottle", "plant", "table", "wall"]
    assert query_string(tags, scores, "distinct") == "bottle plant table wall"
    assert query_string(["dog", "cat", "dog"]) == "dog cat dog"  # no scores: region order
    assert query_string(["", "  "]) == "" and query_string(["", " "], None, "distinct") == ""
    with pytest.raises(ConfigError, match="not one of"):
        query_string(["dog"], None, "sorted")


def test_closed_config_sets_are_checked_when_the_config_loads():
    from raysys import config
    from raysys.config import ConfigError

    cfg = config.load(RetrievalConfig, None, ["embed.query=distinct", "index=IVF8,Flat", "nprobe=3"])
    assert cfg.backend == "faiss" and cfg.embed.query == "distinct"
    assert cfg.index_options() == IndexOptions("IVF8,Flat", 3, cfg.train_size, cfg.seed, cfg.threads_per_shard)
    with pytest.raises(ConfigError, match="embed.query: 'sorted' is not one of"):
        config.load(RetrievalConfig, None, ["embed.query=sorted"])
    with pytest.raises(ConfigError, match="unknown index backend 'annoy'"):
        RetrievalConfig(backend="annoy").check()


def test_merge_topk_is_exact_with_ties():
    rng = np.random.default_rng(0)
    n, d, k = 3000, 16, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[1500:1600] = x[:100]  # exact duplicates: ties across shards
    q = rng.standard_normal((50, d)).astype(np.float32)
    q[:5] = x[:5]
    full = q @ x.T
    ranges = shard_ranges(n, 4)
    parts = [ShardIndex(lambda lo=lo, hi=hi: x[lo:hi], lo) for lo, hi in ranges]
    D, ix = merge_topk(*zip(*[p.search(q, k) for p in parts]), k)
    ref = np.sort(full, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(D, ref, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, ix, 1), D, atol=1e-5)
    # among equal scores, the lower global row comes first (stable ids whatever the sharding)
    assert (np.diff(D, axis=1) <= 1e-6).all()
    tie = D[:, :-1] == D[:, 1:]
    assert (ix[:, :-1][tie] < ix[:, 1:][tie]).all()


def test_shard_ranges_cover_without_empty_shards():
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16", "IVF8,SQ8", "PCA16,IVF8,Flat", "IVF8,PQ8x4,RFlat"])
def test_approximate_factories_train_on_a_sample_and_find_neighbours(factory):
    import faiss

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 32)).astype(np.float32)
    label = rng.integers(20, size=4000)
    x = centres[label] + 0.1 * rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = ShardIndex(lambda: x, 1000, IndexOptions(factory, nprobe=4, train_size=2000, seed=0))
    D, ix = s.search(x[:100], 5)
    assert (ix >= 1000).all()  # global rows = local + offset
    same_cluster = (label[ix - 1000] == label[:100, None]).mean()
    assert same_cluster > 0.95, (factory, same_cluster)
    if "IVF" in factory:
        assert faiss.extract_index_ivf(s.index.faiss).nprobe == 4  # set through PCA / refine wrappers too


def test_bad_index_string_is_a_config_error():
    from raysys.config import ConfigError
    from raysys.corpus.index import check_factory

    with pytest.raises(ConfigError, match="not a FAISS index_factory string"):
        check_factory("NoSuchIndex", 8, 1000)
    with pytest.raises(ConfigError, match="4096 lists"):
        check_factory("IVF4096,Flat", 8, 1000)
    check_factory("IVF16,Flat", 8, 1000)


def test_tag_coverage_matches_words_and_plurals():
    from raysys.corpus.diagnostics import chance_recall, tag_coverage

    assert tag_coverage(["dog", "person", "traffic light", "dog"], ["Two dogs and three people."]) == pytest.approx(2 / 3)
    assert tag_coverage(["traffic light"], ["a row of traffic  lights"]) == 1.0
    assert tag_coverage(["cat"], ["a catalogue"]) == 0.0
    assert chance_recall(100, 5, 5) == pytest.approx(1 - math.comb(95, 5) / math.comb(100, 5))


def test_bench_synthetic_rows_are_range_independent_and_compare_handles_ties():
    from raysys.bench.retrieve import compare_topk, synth_rows

    bases = np.random.default_rng(0).standard_normal((7, 12)).astype(np.float32)
    whole = synth_rows(bases, 3, 0.5, 0, 70_000)
    np.testing.assert_array_equal(synth_rows(bases, 3, 0.5, 65_530, 65_540), whole[65_530:65_540])
    np.testing.assert_allclose(np.linalg.norm(whole[:100], axis=1), 1, atol=1e-6)
    D = np.array([[0.9, 0.7, 0.5]], np.float32)
    assert compare_topk(D, np.array([[1, 2, 3]]), D, np.array([[1, 2, 4]]))["exact_identical"]
    assert not compare_topk(D, np.array([[1, 2, 3]]), D, np.array([[1, 5, 3]]))["exact_identical"]


# ---------------------------------------------------------------- bad input (fails before Ray starts)


def _tiny_images(path: Path, tags_per_image: list[list[str]]) -> None:
    recs = [
        ImageRecord(f"im{i}", 100, 100, np.tile(np.array([[0, 0, 10, 10]], np.float32), (len(t), 1)),
                    np.ones((len(t), 8), np.float32), t, np.ones(len(t), np.float32), np.zeros(len(t), np.int32))  # fmt: skip
        for i, t in enumerate(tags_per_image)
    ]
    write_parquet_atomic(images_table(recs, 8), path / "images" / shard_name(0))


def _tiny_texts(path: Path, texts: list[str]) -> None:
    t = pa.table({"text_id": [f"t{i}" for i in range(len(texts))], "text": texts, "source": ["x"] * len(texts)}, schema=TEXTS_SCHEMA)
    write_parquet_atomic(t, path / "texts" / shard_name(0))


def test_image_without_tags_strict_is_a_clear_error(tmp_path):
    _tiny_images(tmp_path, [["dog"], ["", " "]])
    _tiny_texts(tmp_path, ["a dog"])
    with pytest.raises(ContractError) as e:
        retrieve(tmp_path, RetrievalConfig(embed=EmbedConfig(strict=True)))
    msg = str(e.value)
    assert "row 1" in msg and "'tags'" in msg and "im1" in msg and "query would be empty" in msg and "\n" not in msg
    _tiny_images(tmp_path, [[], [" "]])
    with pytest.raises(ContractError, match="none of the 2 images has a tag"):
        retrieve(tmp_path)


def test_image_without_tags_is_skipped_and_counted(tmp_path, ray_session, caplog):
    """About a quarter of real Flickr8k photos get no detection: they must not stop retrieval."""
    _tiny_images(tmp_path, [["dog", "dog"], ["", " "], ["cat"], []])
    _tiny_texts(tmp_path, ["a dog runs on the grass", "a cat sleeps on a sofa", "a red bus on a street"])
    with caplog.at_level("WARNING", logger="raysys.corpus.embedding"):
        rep = retrieve(tmp_path, RetrievalConfig(k=2, shards=1))
    assert rep["embed"]["images"]["skipped_no_tags"] == 2
    warn = [r.getMessage() for r in caplog.records if "without tags" in r.getMessage()]
    assert len(warn) == 1 and "row 1: field 'tags'" in warn[0] and "2 image(s)" in warn[0]
    pairs = read_pairs(tmp_path, 1).to_pydict()
    assert dict(zip(pairs["image_id"], pairs["text_id"])) == {"im0": "t0", "im2": "t1"}


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    _tiny_images(tmp_path, [["dog"]])
    with pytest.raises(ContractError, match="text corpus is empty"):
        retrieve(tmp_path)
    _tiny_texts(tmp_path, [])
    from raysys.cli import main

    assert main(["retrieve", "--data", str(tmp_path), "--k", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysys: error:") and "text corpus is empty" in err and "\n" not in err
    shutil.rmtree(tmp_path / "images")
    _tiny_texts(tmp_path, ["a dog"])
    with pytest.raises(ContractError, match="image set is empty"):
        retrieve(tmp_path)


def test_blank_text_and_duplicate_ids_are_clear_errors(tmp_path):
    _tiny_images(tmp_path, [["dog"]])
    _tiny_texts(tmp_path, ["a dog", "   "])
    with pytest.raises(ContractError, match="row 1: field 'text': empty text"):
        retrieve(tmp_path)
    t = pa.table({"text_id": ["a", "a"], "text": ["x", "y"], "source": ["s", "s"]}, schema=TEXTS_SCHEMA)
    write_parquet_atomic(t, tmp_path / "texts" / shard_name(0))
    with pytest.raises(ContractError, match="duplicate id 'a'"):
        retrieve(tmp_path)


# ---------------------------------------------------------------- the demo world


def test_world_retrieval_beats_random_and_finds_gold(retrieved, world):
    """Margins from the world's construction (raysys/data/world.py):

    * a random sentence is a true caption with p = 5/7 (5 captions + 2 distractors per image); a
      caption names at most 3 of the 80 classes, so a given tag appears in it with p <= 3/80, and
      in K = 5 random sentences with p <= 1 - (1 - 3/80 · 5/7)^5 ≈ 0.126: random coverage must stay
      below that bound;
    * the query is made of the image's tags, 85 % of which are true classes, and every true
      caption names 1–3 of the image's true classes, so retrieved sentences must cover at least a
      third of the tags (one of the ≤ 3 mentioned per caption) — well above random.
    * gold recall@5: chance is 1 - C(N-5, 5)/C(N, 5) ≈ 1.8 % for N = 1,400 texts; sentences that
      name the query's classes are mostly true captions of *some* image with those classes, so
      recall must be at least 10× chance.
    """
    r = retrieved
    bound = 1 - (1 - 3 / 80 * 5 / 7) ** 5
    print(f"\ntag coverage retrieved {r['tag_coverage_retrieved']:.3f} vs random {r['tag_coverage_random']:.3f} "
          f"(random bound {bound:.3f}); gold recall@5 {r['gold_recall_at_k']:.3f} "
          f"(chance {r['gold_recall_random']:.3f}); recall@1 {r['gold_recall_at']['1']:.3f}")  # fmt: skip
    assert r["tag_coverage_random"] < bound
    assert r["tag_coverage_retrieved"] > max(1 / 3, r["tag_coverage_random"] + 0.3)
    assert r["gold_recall_at_k"] >= 10 * r["gold_recall_random"]
    assert r["gold_recall_at"]["1"] <= r["gold_recall_at"]["5"]

    pairs = read_pairs(world)
    assert pairs.num_rows == 200 * 5
    assert pairs.schema.field("rank").type == pa.int16()
    df = pairs.to_pandas()
    assert sorted(df["rank"].unique()) == [0, 1, 2, 3, 4]
    assert (df.groupby("image_id")["score"].apply(lambda s: (np.diff(s.to_numpy()) <= 1e-6).all())).all()
    # the scores are cosines of the stored unit vectors
    from raysys.corpus.embedding import read_embeddings

    ids_i, vi = read_embeddings(world, "images")
    ids_t, vt = read_embeddings(world, "texts")
    np.testing.assert_allclose(np.linalg.norm(vt, axis=1), 1, atol=1e-5)
    ti = {t: j for j, t in enumerate(ids_t.to_pylist())}
    ii = {t: j for j, t in enumerate(ids_i.to_pylist())}
    row = df.iloc[7]
    assert float(vi[ii[row.image_id]] @ vt[ti[row.text_id]]) == pytest.approx(row.score, abs=1e-5)
    # diagnostics on disk
    rep = json.loads((world / "diagnostics" / "retrieval.json").read_text())
    for key in ("tag_coverage_retrieved", "tag_coverage_random", "gold_recall_at_k", "examples"):
        assert key in rep
    assert len(rep["examples"]) == 5 and all(len(e["retrieved"]) == 5 for e in rep["examples"])
    assert "## img" in (world / "diagnostics" / "retrieval.md").read_text()


def test_smaller_k_is_served_from_stored_pairs(retrieved, world):
    before = {f: f.stat().st_mtime_ns for f in shard_files(world, "pairs")}
    r3 = retrieve(world, RetrievalConfig(k=3, shards=3))
    assert r3["k"] == 3 and r3["k_stored"] == 5 and r3["pairs_shards_computed"] == 0
    assert r3["embed"]["images"]["computed"] == 0 and r3["embed"]["texts"]["computed"] == 0
    assert {f: f.stat().st_mtime_ns for f in shard_files(world, "pairs")} == before
    assert read_pairs(world, 3).num_rows == 600
    assert retrieved["gold_recall_at"]["1"] <= r3["gold_recall_at_k"] <= retrieved["gold_recall_at"]["5"]


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(root)): (f.stat().st_ino, f.stat().st_mtime_ns)
            for d in ("embeddings/images", "embeddings/texts", "pairs") for f in sorted((root / d).glob("*.parquet"))}  # fmt: skip


def test_crash_between_shards_resumes_without_recomputing(small_world, retrieved, world, tmp_path):
    """Crash twice (during embedding, then during search), re-run: finished shards are not
    rewritten, the rest are, and the output equals the uninterrupted run's byte for byte."""
    data = reshard(small_world, tmp_path / "data")
    cfg = RetrievalConfig(**CONFIG)  # as the uninterrupted run of `world`
    written: list[Path] = []
    with pytest.raises(SimulatedCrash):
        retrieve(data, cfg, on_shard=crash_after(3, written))  # 6 embedding shards + 4 pairs shards in all
    after1 = _state(data)
    assert len(after1) == 3 and not list((data / "pairs").glob("*.parquet"))

    written2: list[Path] = []
    with pytest.raises(SimulatedCrash):
        retrieve(data, cfg, on_shard=crash_after(4, written2))  # the 3 missing embedding shards + 1 pairs shard
    after2 = _state(data)
    assert {k: v for k, v in after2.items() if k in after1} == after1  # nothing finished was redone
    assert {str(p.relative_to(data)) for p in written2} == set(after2) - set(after1)
    assert len(list((data / "pairs").glob("*.parquet"))) == 1

    written3: list[Path] = []
    rep = retrieve(data, cfg, on_shard=lambda p: written3.append(p))
    after3 = _state(data)
    assert {k: v for k, v in after3.items() if k in after2} == after2
    assert len(written3) == 3 and all(p.parent.name == "pairs" for p in written3)
    assert rep["pairs_shards_computed"] == 3 and rep["embed"]["texts"]["computed"] == 0

    for table in ("pairs", "embeddings/images", "embeddings/texts"):
        for a, b in zip(sorted((data / table).glob("*.parquet")), sorted((world / table).glob("*.parquet"))):
            assert pq.read_table(a).equals(pq.read_table(b)), f"{table}/{a.name} differs from the uninterrupted run"
    assert rep["tag_coverage_retrieved"] == retrieved["tag_coverage_retrieved"]


def test_diagnostics_go_to_the_active_mlflow_run(world, retrieved, tmp_path):
    import mlflow

    from raysys.corpus.diagnostics import write_report

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("retrieval-test")
    with mlflow.start_run() as run:
        write_report(world, "retrieval", retrieved)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.metrics["retrieval.tag_coverage_retrieved"] == pytest.approx(retrieved["tag_coverage_retrieved"])
    assert got.data.metrics["retrieval.gold_recall_at_k"] == pytest.approx(retrieved["gold_recall_at_k"])
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "diagnostics")]
    assert "diagnostics/retrieval.json" in arts and "diagnostics/retrieval.md" in arts


# ---------------------------------------------------------------- real features: LXMERT TSV → COCO captions


def _lxmert_into_coco(shared: Path, out: Path, coco_images: int) -> Path:
    from raysys.data.importers import import_lxmert_tsv, import_texts

    tsv = shared / "region_features_lxmert_tsv" / "train.tsv"
    import_lxmert_tsv(tsv, shared / "vg_vocab" / "objects_vocab.txt", out)
    entries = json.loads((shared / "text" / "coco_karpathy_captions" / "mscoco_test.json").read_text())
    sub = out.parent / "coco_subset.json"
    sub.write_text(json.dumps(entries[:coco_images] if coco_images else entries))
    import_texts([sub], "coco-json", out, source="coco")
    return out


def _show_and_check_tsv(rep: dict, expect_bottle: bool) -> None:
    print(f"\nLXMERT TSV (8 real images) → COCO captions ({rep['texts']} texts): tag coverage retrieved "
          f"{rep['tag_coverage_retrieved']:.3f} vs random {rep['tag_coverage_random']:.3f}")  # fmt: skip
    for ex in rep["examples"]:
        print(f"\n{ex['image_id']}  query: {ex['query']}")
        for r in ex["retrieved"]:
            print(f"  {r['rank'] + 1}. [{r['score']:.3f}] {r['text']}")
    assert rep["images"] == 8 and rep["images_with_pairs"] == 8
    assert rep["tag_coverage_retrieved"] > rep["tag_coverage_random"] + 0.1
    by_id = {e["image_id"]: e for e in rep["examples"]}
    bottles = " ".join(r["text"].lower() for r in by_id["dev-850-0-img1"]["retrieved"])  # 20 of 36 regions: bottle
    plants = " ".join(r["text"].lower() for r in by_id["dev-850-0-img0"]["retrieved"])  # plants, garden, flowers
    assert any(w in plants for w in ("plant", "garden", "flower"))
    if expect_bottle:  # COCO captions about bottles are mostly wine on tables: too few in a 1,000-image subset
        assert "bottle" in bottles


def test_lxmert_tsv_images_retrieve_coco_captions(shared_data, ray_session, tmp_path):
    data = _lxmert_into_coco(shared_data, tmp_path / "data", coco_images=1000)  # 5,000 captions
    rep = retrieve(data, RetrievalConfig(k=5, shards=2, examples=8))
    _show_and_check_tsv(rep, expect_bottle=False)


@pytest.mark.slow
def test_lxmert_tsv_images_retrieve_all_coco_test_captions(shared_data, ray_session, tmp_path):
    data = _lxmert_into_coco(shared_data, tmp_path / "data", coco_images=0)  # 5,000 images × 5 captions
    rep = retrieve(data, RetrievalConfig(k=5, shards=2, examples=8))
    _show_and_check_tsv(rep, expect_bottle=True)


# ---------------------------------------------------------------- CLI and benches


@pytest.mark.slow
def test_cli_retrieve_and_benches_run_small(small_world, tmp_path):
    env = {**os.environ, "RAYSYS_RAY_TMP": str(Path("/tmp") / f"rsb-{os.getpid()}")}
    data = tmp_path / "data"
    shutil.copytree(small_world, data)
    raysys = [sys.executable, "-m", "raysys"]
    out = subprocess.run([*raysys, "retrieve", "--data", str(data), "--k", "4", "--shards", "2"], capture_output=True,
                         text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout)
    assert rep["k"] == 4 and rep["tag_coverage_retrieved"] > rep["tag_coverage_random"]
    out = subprocess.run([*raysys, "bench", "retrieve", "--n-corpus", "30000", "--n-queries", "500", "--bases", "300",
                          "--query-bases", "100", "--ivf", "IVF64,Flat", "--nprobe", "8"],
                         capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    b = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nbench retrieve (small):", b)
    assert b["exact_identical"] and b["max_score_diff"] <= 1e-5 and b["ivf_recall_at_10"] > 0.8
    for key in ("speed_ratio", "ivf_speed_ratio", "peak_rss_mb", "data"):
        assert key in b
    out = subprocess.run([*raysys, "bench", "embed", "--n", "3000", "--shard-rows", "1000"],
                         capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    b = json.loads(out.stdout.strip().splitlines()[-1])
    print("bench embed (small):", b)
    assert b["rows_written"] == 3000 and b["max_abs_diff_vs_baseline"] < 1e-5
    for key in ("sentences_per_s", "baseline_sentences_per_s", "ratio", "peak_rss_mb"):
        assert key in b


# ---------------------------------------------------------------- query modes, tag sources, gold recall@c


def test_tag_mean_query_is_the_mean_of_separately_embedded_tags():
    """The official query (zmykevin/UVLP issue #2): each tag embedded alone, the image = their mean."""
    from raysys.corpus.embedding import encode_deterministic, image_query, load_model

    model = load_model("", "cpu")
    tags, scores = ["Dog", "frisbee", "grass", "dog"], [0.9, 0.8, 0.3, 0.5]
    q = image_query([(tags, scores)], "regions", "tag_mean")
    q_distinct = image_query([(tags, scores)], "distinct", "tag_mean")
    q_shuffled = image_query([(tags[::-1], scores[::-1])], "regions", "tag_mean")
    got = encode_deterministic(model, [q, q_distinct, q_shuffled, "a dog catches a frisbee"])
    one = {t: encode_deterministic(model, [t])[0] for t in ("dog", "frisbee", "grass")}

    def unit_mean(ts: list[str]) -> np.ndarray:
        m = np.mean([one[t] for t in ts], axis=0)
        return m / np.linalg.norm(m)

    np.testing.assert_allclose(got[0], unit_mean(["dog", "frisbee", "grass", "dog"]), atol=1e-6)  # one per region
    np.testing.assert_allclose(got[1], unit_mean(["dog", "frisbee", "grass"]), atol=1e-6)  # each tag once
    np.testing.assert_allclose(got[2], got[0], atol=1e-6)  # tag order does not matter
    alone = encode_deterministic(model, [q])[0]
    np.testing.assert_array_equal(alone, got[0])  # nor the batch it came in
    as_string = encode_deterministic(model, [image_query([(tags, scores)], "regions", "string")])[0]
    assert float(as_string @ got[0]) < 0.999  # the string query is another vector
    # both sources: detector tags then ImageNet labels, each embedded alone
    both = image_query([(["dog"], [0.9]), (["Labrador Retriever"], [0.4])], "distinct", "tag_mean")
    m = (one["dog"] + encode_deterministic(model, ["labrador retriever"])[0]) / 2
    np.testing.assert_allclose(encode_deterministic(model, [both])[0], m / np.linalg.norm(m), atol=1e-6)
    assert image_query([([], []), ([], [])], "regions", "tag_mean") == ""  # no tag: no query


def test_gold_recall_at_cutoffs_on_a_hand_made_gold_set(tmp_path):
    from raysys.corpus.diagnostics import exact_topk, recall_at
    from raysys.corpus.embedding import vectors_table

    gold = {"a": {"t1"}, "b": {"t7", "t8"}, "c": {"t3"}, "d": {"t0"}}
    retrieved = {
        "a": ["t1", "t2", "t3"],  # hit at rank 1
        "b": ["t0", "t2", "t8"],  # hit at rank 3
        "c": ["t0", "t1", "t2", "t4", "t5", "t6", "t9", "t3"],  # hit at rank 8
    }  # "d" has no query: a miss at every cutoff
    assert recall_at(retrieved, gold, [1, 5, 10]) == {"1": 0.25, "5": 0.5, "10": 0.75}
    assert recall_at({}, {}, [1]) == {"1": 0.0}

    # exact top-c over stored embeddings: score descending, then text row ascending on ties
    e = np.eye(3, dtype=np.float32)
    texts = np.stack([e[1], e[0], e[0], (e[0] + e[1]) / np.sqrt(2)]).astype(np.float32)
    write_parquet_atomic(vectors_table(["x", "y"], e[:2]), tmp_path / "embeddings" / "images" / shard_name(0))
    write_parquet_atomic(vectors_table(["t0", "t1", "t2", "t3"], texts), tmp_path / "embeddings" / "texts" / shard_name(0))
    assert exact_topk(tmp_path, ["x", "y", "z"], 3) == {"x": ["t1", "t2", "t3"], "y": ["t0", "t3", "t1"]}


def _labelled_images(path: Path, det: list[list[str]], labels: list[list[str]] | None) -> None:
    _tiny_images(path, det)
    if labels is not None:
        t = pq.read_table(path / "images" / shard_name(0))
        t = t.append_column("image_tags", pa.array(labels, pa.list_(pa.string())))
        t = t.append_column("image_tag_scores", pa.array([[0.5] * len(x) for x in labels], pa.list_(pa.float32())))
        write_parquet_atomic(t, path / "images" / shard_name(0))


def test_imagenet_tag_source_and_tag_mean_retrieve_with_gold_recall(tmp_path, ray_session):
    from raysys.contract import GOLD_SCHEMA

    # im1 has no detector tag: only the ImageNet labels give it a query
    _labelled_images(tmp_path, [["dog"], [], ["bus"]], None)
    _tiny_texts(tmp_path, ["a cat sleeps on a sofa", "a dog runs on the grass", "a red bus on a street", "a pizza"])
    gold = pa.table({"image_id": ["im0", "im1", "im2"], "text_id": ["t1", "t0", "t2"], "split": ["train"] * 3},
                    schema=GOLD_SCHEMA)  # fmt: skip
    write_parquet_atomic(gold, tmp_path / "gold" / shard_name(0))
    det = retrieve(tmp_path, RetrievalConfig(k=1, shards=1))  # no labels: the default `auto` is the detector
    assert det["tag_source"] == "detector" and det["embed"]["images"]["skipped_no_tags"] == 1
    third = pytest.approx(2 / 3, abs=1e-4)  # im1 has no query: a miss at every cutoff, over all gold images
    assert det["gold_recall_at"] == {"1": third, "5": third, "10": third}
    assert det["gold_recall_exact_cutoffs"] == [5, 10]  # K = 1 stored: recall@5/10 from the embeddings
    cfg = RetrievalConfig(k=1, shards=1, embed=EmbedConfig(query_mode="tag_mean", tag_source="imagenet"))
    with pytest.raises(ContractError, match="imagenet_top"):  # featurized without the labels
        retrieve(tmp_path, cfg)

    _labelled_images(tmp_path, [["dog"], [], ["bus"]], [["Labrador Retriever"], ["tabby cat", "sofa"], ["school bus"]])
    rep = retrieve(tmp_path, cfg)
    assert rep["query_mode"] == "tag_mean" and rep["tag_source"] == "imagenet"
    assert rep["embed"]["images"]["skipped_no_tags"] == 0 and rep["gold_recall_at"]["1"] == 1.0
    assert set(rep["gold_recall_at"]) == {"1", "5", "10"}
    assert {ex["image_id"]: ex["query"] for ex in rep["examples"]}["im1"] == "mean(tabby cat | sofa)"
    both = retrieve(tmp_path, RetrievalConfig(k=1, shards=1))  # labels everywhere: `auto` is both
    assert both["tag_source"] == "both" and both["embed"]["images"]["skipped_no_tags"] == 0
    assert {ex["image_id"]: ex["query"] for ex in both["examples"]}["im0"] == "dog labrador retriever"
    pairs = read_pairs(tmp_path, 1).to_pydict()
    assert dict(zip(pairs["image_id"], pairs["text_id"])) == {"im0": "t1", "im1": "t0", "im2": "t2"}
    from raysys.config import ConfigError

    for bad, key in ((EmbedConfig(query_mode="sum"), "query_mode"), (EmbedConfig(tag_source="clip"), "tag_source")):
        with pytest.raises(ConfigError, match=key):
            RetrievalConfig(embed=bad).check()


# ---------------------------------------------------------------- small inputs: in the driver, same outputs


def test_packaged_minilm_on_plain_transformers_is_bit_identical_to_sentence_transformers(world):
    """`PackagedMiniLM` (the Embedder's encoder: no sentence-transformers import) gives the very
    vectors of `SentenceTransformer.encode`, on the world's queries and texts and on edge cases."""
    from raysys.contract import read_table
    from raysys.corpus.embedding import PackagedMiniLM, encode_deterministic, load_model

    images = read_table(world, "images", ["tags", "tag_scores"])
    texts = [query_string(t, s) for t, s in zip(images.column("tags").to_pylist(), images.column("tag_scores").to_pylist())]
    texts += read_table(world, "texts", ["text"]).column("text").to_pylist()[:400]
    texts += ["a", "Ünïcödé  words\tand\nspaces", "dog " * 400, "x" * 700, "A man riding a horse."]
    plain, st = PackagedMiniLM("cpu"), load_model("", "cpu")
    assert plain.max_seq_length == st.max_seq_length and plain.get_embedding_dimension() == 384
    np.testing.assert_array_equal(encode_deterministic(plain, texts), encode_deterministic(st, texts))
    mixed = texts[:40] + texts[-5:]  # padded batches too: the same batching as encode's
    kw = {"batch_size": 16, "normalize_embeddings": True, "convert_to_numpy": True, "show_progress_bar": False}
    np.testing.assert_array_equal(plain.encode(mixed, **kw), st.encode(mixed, **kw))


def test_small_inputs_embedded_in_the_driver_equal_the_actor_pools(small_world, world, tmp_path, ray_session):
    """`world` was embedded in the driver (its rows ≤ driver_rows); the Ray actor pool
    (driver_rows=0) writes byte-identical embeddings."""
    cfg = EmbedConfig()
    data = reshard(small_world, tmp_path / "data")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for t in ("images", "texts") for f in (data / t).glob("*.parquet"))
    assert rows <= cfg.driver_rows  # so `world` took the driver path
    from raysys.corpus.embedding import embed

    rep = embed(data, EmbedConfig(driver_rows=0))
    assert rep["texts"]["computed"] == 2 and rep["images"]["computed"] == 4
    for table in ("embeddings/images", "embeddings/texts"):
        mine, ref = sorted((data / table).glob("*.parquet")), sorted((world / table).glob("*.parquet"))
        assert len(mine) == len(ref) > 0
        for a, b in zip(mine, ref):
            assert pq.read_table(a).equals(pq.read_table(b)), f"{table}/{a.name}: the actor pool differs from the driver"


def test_small_phrase_inputs_parsed_in_the_driver_equal_the_actor_pools(world, tmp_path, ray_session):
    """Phrases of the same pairs: parsed in the driver (default) and by the Ray actor pool
    (driver_rows=0), byte-identical."""
    from raysys.corpus.phrases import PhrasesConfig, extract_phrases

    out = {}
    for name, cfg in (("driver", PhrasesConfig()), ("ray", PhrasesConfig(driver_rows=0))):
        data = tmp_path / name
        shutil.copytree(world, data, ignore=shutil.ignore_patterns("phrases"))
        extract_phrases(data, cfg)
        out[name] = sorted((data / "phrases").glob("*.parquet"))
    assert len(out["driver"]) == len(out["ray"]) == 4
    for a, b in zip(out["driver"], out["ray"]):
        assert pq.read_table(a).equals(pq.read_table(b)), f"phrases/{a.name}: the actor pool differs from the driver"
