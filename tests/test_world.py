"""The demo world: deterministic, as hard as documented, captions grounded in hidden truth."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from raysys.contract import count_rows, read_manifest, read_table, region_arrays, validate_dataset
from raysys.data.world import COCO_CLASSES, WorldConfig, plural, write_world
from raysys.evaluate.tasks import read_task


def _truth(root):
    t = read_table(root, "world_truth")
    return np.concatenate([np.asarray(c, dtype=np.int64) for c in t.column("classes").to_pylist()])


def test_world_counts_and_contract(small_world):
    counts = validate_dataset(small_world)
    man = read_manifest(small_world)
    assert counts["images"] == 200 and man["feature_dim"] == 2048
    assert counts["gold"] == 200 * 5
    assert counts["texts"] == 200 * 5 + 400  # 2 distractors per image
    assert man["tag_vocab"] == COCO_CLASSES
    t = read_table(small_world, "images")
    n = np.asarray(t.column("boxes").combine_chunks().value_lengths())
    assert n.min() >= 3 and n.max() <= 12
    feats = region_arrays(t)["features"]
    assert feats.dtype == np.float16 and (feats >= 0).all()
    assert (feats > 0).mean() < 0.10  # sparse
    gold = read_table(small_world, "gold").to_pandas()
    assert abs((gold.split == "eval").mean() - 0.1) < 1e-9


def test_world_detector_error_rate(small_world):
    t = read_table(small_world, "images")
    det = np.concatenate([np.asarray(c) for c in t.column("class_ids").to_pylist()])
    truth = _truth(small_world)
    err = (det != truth).mean()
    assert 0.10 < err < 0.20, err  # configured 15 %


def test_world_linear_probe_is_separable_not_trivial(tmp_path):
    """A ridge linear probe on single regions lands in the documented 60-90 % band."""
    out = tmp_path / "w"
    write_world(WorldConfig(images=1500, seed=3), out)
    X = region_arrays(read_table(out, "images"))["features"].astype(np.float32)
    y = _truth(out)
    n = len(y)
    ntr = int(0.7 * n)
    Xb = np.c_[X, np.ones(n, np.float32)]
    Y = np.eye(len(COCO_CLASSES), dtype=np.float32)[y[:ntr]]
    W = np.linalg.solve(Xb[:ntr].T @ Xb[:ntr] + np.eye(Xb.shape[1], dtype=np.float32), Xb[:ntr].T @ Y)
    acc = float((np.argmax(Xb[ntr:] @ W, 1) == y[ntr:]).mean())
    print(f"linear probe accuracy on one region: {acc:.3f}")
    assert 0.60 <= acc <= 0.90, acc


def test_world_captions_name_true_classes(small_world):
    texts = read_table(small_world, "texts").to_pandas().set_index("text_id")
    gold = read_table(small_world, "gold").to_pandas()
    classes = read_table(small_world, "world_truth").to_pandas().set_index("image_id")
    hits = 0
    for row in gold.itertuples():
        cap = texts.loc[row.text_id, "text"].lower()
        names = {COCO_CLASSES[c] for c in classes.loc[row.image_id, "classes"]}
        hits += any(n in cap or plural(n) in cap for n in names)
    assert hits == len(gold)  # every true caption mentions one of its image's objects
    assert set(texts.source) == {"caption", "distractor"}


def test_world_deterministic_and_shard_independent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_world(WorldConfig(images=60, seed=11, feature_dim=64), a)
    write_world(WorldConfig(images=60, seed=11, feature_dim=64, rows_per_shard=7, workers=1), b)
    write_world(WorldConfig(images=60, seed=12, feature_dim=64), c)
    for table in ("images", "texts", "gold"):
        ta, tb = read_table(a, table), read_table(b, table)
        assert ta.equals(tb), table
    assert not read_table(a, "images").equals(read_table(c, "images"))
    assert count_rows(b, "images") == 60 and len(list((b / "images").glob("*.parquet"))) == 9
    assert pq.read_schema(next((a / "images").glob("*.parquet"))).field("features").type.value_type.list_size == 64


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _suite_images(root, task, split):
    rows = _jsonl(root / "tasks" / task / f"{split}.jsonl")
    return {i for r in rows for i in ([r["img0"], r["img1"]] if task == "nlvr2" else [r["image"]])}


def test_world_writes_a_downstream_suite_disjoint_from_pretraining(small_world):
    """Task files for the five tasks, each with train and eval splits split by image, all on gold
    "eval" images (which pre-training leaves out), readable by the task readers, and true to the
    hidden truth."""
    man = read_manifest(small_world)
    rec = man["downstream"]
    assert set(rec["tasks"]) == {"vqa", "nlvr2", "ve", "refcoco", "retrieval"}
    gold = read_table(small_world, "gold").to_pandas()
    held_out = set(gold.image_id[gold.split == "eval"])
    pretrain_images = set(gold.image_id[gold.split != "eval"])
    for task, entry in rec["tasks"].items():
        train, evald = _suite_images(small_world, task, "train"), _suite_images(small_world, task, "eval")
        assert train and evald and not train & evald, task
        assert (train | evald) <= held_out and not (train | evald) & pretrain_images, task
        for split in ("train", "eval"):
            ex = read_task(task, [small_world / entry[split]], entry["format"])
            assert len(ex) == entry[f"n_{split}"] > 0
    truth = read_table(small_world, "world_truth").to_pandas().set_index("image_id")
    images = read_table(small_world, "images").to_pandas().set_index("image_id")
    for r in _jsonl(small_world / "tasks" / "vqa" / "train.jsonl"):
        if r["question"].startswith("How many"):
            cls = r["question"][len("How many "):-len(" are there?")]
            n = sum(plural(COCO_CLASSES[c]) == cls for c in truth.loc[r["image"], "classes"])
            assert r["answers"] == [str(n)] * 10
    for r in _jsonl(small_world / "tasks" / "refcoco" / "eval.jsonl"):
        boxes = np.stack(images.loc[r["image"], "boxes"]).reshape(-1, 4)
        assert np.abs(boxes - np.array(r["box"])).max(axis=1).min() < 0.01  # the gold region is one of the image's
    present = {i: {COCO_CLASSES[c] for c in truth.loc[i, "classes"]} for i in truth.index}
    for r in _jsonl(small_world / "tasks" / "ve" / "train.jsonl"):  # presence, true unless a contradiction
        name = r["hypothesis"].split(" in the picture")[0].split(" ", 3)[3]
        assert (name in present[r["image"]]) == (r["label"] != "contradiction"), r
    for r in _jsonl(small_world / "tasks" / "nlvr2" / "train.jsonl"):
        name, a, b = r["sent"][:-1].split(" contain")[1].split(" ", 2)[2], present[r["img0"]], present[r["img1"]]
        assert r["label"] == int(name in a & b if r["sent"].startswith("Both") else name in a | b), r
    labels = {t: [x["label"] for x in _jsonl(small_world / "tasks" / t / "train.jsonl")] for t in ("nlvr2", "ve")}
    assert set(labels["nlvr2"]) == {0, 1} and set(labels["ve"]) == {"entailment", "neutral", "contradiction"}


def test_world_without_tasks_writes_no_suite(tmp_path):
    write_world(WorldConfig(images=40, seed=1, feature_dim=32, tasks=False), tmp_path / "w")
    assert not (tmp_path / "w" / "tasks").exists() and "downstream" not in read_manifest(tmp_path / "w")


def _text_only_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """A hypothesis-only baseline: logistic regression on word unigrams and bigrams, fit on train."""
    import torch

    def grams(s):
        w = s.lower().rstrip(".").split()
        return w + [" ".join(p) for p in zip(w, w[1:])]

    vocab = {g: i for i, g in enumerate(sorted({g for s, _ in train for g in grams(s)}))}
    labels = sorted({y for _, y in train})

    def xy(rows):
        X = torch.zeros(len(rows), len(vocab))
        for i, (s, _) in enumerate(rows):
            for g in grams(s):
                if g in vocab:
                    X[i, vocab[g]] = 1.0
        return X, torch.tensor([labels.index(y) for _, y in rows])

    (X, y), (Xt, yt) = xy(train), xy(test)
    torch.manual_seed(0)
    lin = torch.nn.Linear(len(vocab), len(labels))
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(X), y).backward()
        opt.step()
    return float((lin(Xt).argmax(-1) == yt).float().mean())


def test_suite_statements_alone_score_at_chance(tmp_path):
    """NLVR2 and VE labels live in the images, not in the words: a text-only classifier trained on the
    suite's train split scores no better than the majority label on its eval split (the first grammar
    let it reach 70 % on both, and so base and pre-trained encoders tied)."""
    root = tmp_path / "w"
    write_world(WorldConfig(images=1000, seed=3, eval_fraction=0.4, feature_dim=64), root)
    for task, text in (("nlvr2", "sent"), ("ve", "hypothesis")):
        rows = {s: [(r[text], str(r["label"])) for r in _jsonl(root / "tasks" / task / f"{s}.jsonl")] for s in ("train", "eval")}
        assert len(rows["train"]) > 600 and len(rows["eval"]) > 400, task
        ys = [y for _, y in rows["eval"]]
        majority = max(ys.count(y) for y in set(ys)) / len(ys)
        acc = _text_only_accuracy(rows["train"], rows["eval"])
        assert acc < majority + 0.05, (task, acc, majority)
        seen = {}
        for s, y in rows["train"]:
            seen.setdefault(s, set()).add(y)
        assert sum(len(v) > 1 for v in seen.values()) > 0, task  # the same words occur with either label
