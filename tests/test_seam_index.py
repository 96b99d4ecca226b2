"""The index seam of retrieval (issue 15): a backend defined outside the package, here in this file,
registered by name and loaded into the Ray shard actors with `raysys --plugin`, retrieves the same
pairs as the default FAISS `Flat` index.

This file is its own plugin: `--plugin tests/test_seam_index.py` imports it in the driver and in
every shard actor, whose `@register_index` line then registers the backend there too. The actors
are workers of the session Ray, started before the plugin was named, so they see it only because
the driver hands them its plugin list.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raysys.cli import main
from raysys.corpus.index import IndexOptions, VectorIndex, register_index
from raysys.corpus.retrieval import ShardIndex, read_pairs

BACKEND = "numpy-exact"
TOL = 1e-5


@register_index(BACKEND)
class NumpyExact:
    """Brute force: every inner product, then an exact top-k (ties: lower row first)."""

    def __init__(self, x: np.ndarray):
        self.x = x

    @classmethod
    def build(cls, x: np.ndarray, options: IndexOptions) -> NumpyExact:
        return cls(np.array(x, dtype=np.float32))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = q @ self.x.T
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, top, 1), top.astype(np.int64)

    def info(self) -> dict:
        return {"backend": BACKEND, "factory": "brute-force", "ntotal": len(self.x), "gpu": False}


def printed_report(capsys) -> dict:
    """The report `raysys retrieve` printed (Ray's own warnings, e.g. "(raylet) WARNING: …", may
    also reach stdout in-process: take the last line that is a compact JSON object)."""
    lines = capsys.readouterr().out.splitlines()
    return json.loads(next(ln for ln in reversed(lines) if ln.startswith("{") and ln.endswith("}")))


def topk_by_image(data: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """image_id -> (text ids by rank, scores by rank)."""
    t = read_pairs(data).sort_by([("image_id", "ascending"), ("rank", "ascending")]).to_pydict()
    out: dict[str, tuple[list[str], list[float]]] = {}
    for iid, tid, rank, score in zip(t["image_id"], t["text_id"], t["rank"], t["score"]):
        ids, scores = out.setdefault(iid, ([], []))
        assert rank == len(ids), f"{iid}: ranks not 0..K-1"
        ids.append(tid)
        scores.append(score)
    return {k: (ids, np.array(s, np.float32)) for k, (ids, s) in out.items()}


def tie_explains(tid: str, score: float, other_ids: list[str], other_scores: np.ndarray) -> bool:
    """A text at another rank of the other list with the same score, or, if the other list lacks it,
    a score equal to the other list's K-th (an exact tie at the cut, STACK-NOTES)."""
    if tid in other_ids:
        return abs(other_scores[other_ids.index(tid)] - score) <= TOL
    return abs(other_scores[-1] - score) <= TOL


def assert_same_topk(a: dict, b: dict) -> int:
    """Same images, same text ids at every rank except where exact ties explain the difference,
    scores within TOL by rank; returns the number of (image, rank) places that differ by a tie."""
    assert sorted(a) == sorted(b)
    ties = 0
    for iid in a:
        (ia, sa), (ib, sb) = a[iid], b[iid]
        assert len(ia) == len(ib), iid
        np.testing.assert_allclose(sa, sb, atol=TOL, err_msg=iid)
        for r in range(len(ia)):
            if ia[r] != ib[r]:
                ties += 1
                assert tie_explains(ia[r], sa[r], ib, sb) and tie_explains(ib[r], sb[r], ia, sa), (iid, r, ia, ib, sa, sb)
    return ties


def test_the_backend_follows_the_protocol_and_matches_flat_on_one_shard():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.1 * rng.standard_normal((40, 24)).astype(np.float32)
    assert isinstance(NumpyExact.build(x, IndexOptions()), VectorIndex)
    ours = ShardIndex(lambda: x, 1000, backend=BACKEND)
    flat = ShardIndex(lambda: x, 1000)
    assert ours.info()["backend"] == BACKEND and ours.info()["ntotal"] == 500 and flat.info()["backend"] == "faiss"
    D0, I0 = flat.search(q, 7)
    D1, I1 = ours.search(q, 7)
    np.testing.assert_array_equal(I1, I0)  # random vectors: no ties
    np.testing.assert_allclose(D1, D0, atol=TOL)
    assert (I1 >= 1000).all() and (I1[:, 0] == np.arange(1000, 1040)).all()  # global rows; each query's own row first


def test_an_unknown_backend_is_a_config_error_before_anything_runs(tmp_path, capsys):
    assert main(["retrieve", "--data", str(tmp_path), "--backend", "no-such-index"]) == 2
    err = capsys.readouterr().err
    assert "unknown index backend 'no-such-index'" in err and "'faiss'" in err and "--plugin" in err


def test_plugin_backend_in_the_shard_actors_gives_the_flat_pairs(tmp_path, ray_session, capsys, monkeypatch):
    monkeypatch.delenv("RAYSYS_PLUGINS", raising=False)  # --plugin exports it; restored after the test
    data = tmp_path / "data"
    assert main(["world", "--images", "300", "--seed", "11", "--out", str(data)]) == 0
    capsys.readouterr()

    assert main(["retrieve", "--data", str(data), "--k", "5"]) == 0
    flat = printed_report(capsys)
    flat_pairs = topk_by_image(data)

    # same embeddings (reused), other backend: every pairs shard is searched again, in the actors
    assert main(["--plugin", __file__, "retrieve", "--data", str(data), "--k", "5", "--backend", BACKEND]) == 0
    ours = printed_report(capsys)
    assert ours["backend"] == BACKEND and flat["backend"] == "faiss"
    assert ours["pairs_shards_computed"] == ours["pairs_shards"] >= 1 and ours["embed"]["texts"]["computed"] == 0
    assert ours["shards"] == flat["shards"] == 2
    ours_pairs = topk_by_image(data)
    assert len(flat_pairs) == flat["images_with_pairs"] > 250 and ours["pairs"] == flat["pairs"] == 5 * len(flat_pairs)
    ties = assert_same_topk(flat_pairs, ours_pairs)
    assert ties <= 0.01 * flat["pairs"], f"{ties} places differ by ties"
    for key in ("tag_coverage_retrieved", "mean_score_at_1", "gold_recall_at_k"):
        assert ours[key] == pytest.approx(flat[key], abs=2e-3), key

    # back to the default: the stored FAISS pairs are not reused for the other backend's parameters
    assert main(["retrieve", "--data", str(data), "--k", "5"]) == 0
    again = printed_report(capsys)
    assert again["pairs_shards_computed"] == again["pairs_shards"]
    assert_same_topk(flat_pairs, topk_by_image(data))
