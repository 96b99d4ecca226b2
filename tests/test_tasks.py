"""Downstream tasks: a reader test per official format, one-line errors for malformed files, and
every fine-tuning task end to end on its fixture with its metric in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raysys.contract import ContractError
from raysys.evaluate.metrics import gold_ranks
from raysys.evaluate.tasks import read_task, strip_entities
from raysys.evaluate.tasks.retrieval import chance_r_mean

# ---------------------------------------------------------------- readers of the official formats


@pytest.fixture(scope="module")
def fx(shared_data) -> Path:
    return shared_data / "task_fixtures"


def test_vqa_official_questions_and_annotations(fx):
    ex = read_task("vqa", [fx / "vqav2/annotations.json", fx / "vqav2/questions.json"])  # any order
    assert [e.uid for e in ex] == ["458752000", "458752001", "458752002"]
    assert ex[0].text == "What is this photo taken looking through?"
    assert len(ex[0].label) == 10 and ex[0].label.count("net") == 6
    assert ex[0].images == ["458752"] and ex[0].prefer == [["COCO_train2014_000000458752"]]
    # questions alone: examples without answers (prediction only)
    assert read_task("vqa", [fx / "vqav2/questions.json"])[0].label is None


def test_vqa_simple_rows(tmp_path):
    f = tmp_path / "vqa.jsonl"
    f.write_text('{"image": "a.jpg", "question": "What colour?", "answers": ["red", "red", "blue"]}\n')
    (e,) = read_task("vqa", [f])
    assert e.images == ["a.jpg"] and e.label == ["red", "red", "blue"]


def test_nlvr2_official_jsonl_names_both_images(fx):
    ex = read_task("nlvr2", [fx / "nlvr2/tiny-dev.json"])
    assert len(ex) == 8
    assert ex[0].uid == "dev-850-0-0" and ex[0].images == ["dev-850-0-img0", "dev-850-0-img1"] and ex[0].label == 0
    assert ex[1].label == 1  # "True"


def test_nlvr2_lxmert_json(shared_data):
    ex = read_task("nlvr2", [shared_data / "region_features_lxmert_tsv/instances_train.json"])
    assert len(ex) == 8 and ex[0].images == ["dev-850-0-img0", "dev-850-0-img1"] and ex[1].label == 1


def test_snli_ve_official_jsonl(fx):
    ex = read_task("snli-ve", [fx / "visual_entailment/sample_pairs.jsonl"])
    assert len(ex) == 16
    assert ex[0].images == ["2248275918"] and ex[0].text == "A toddler sleeps outside." and ex[0].label == 2
    assert [e.label for e in ex[:3]] == [2, 1, 0]  # contradiction, neutral, entailment


def test_refcoco_refs_and_instances_layout(tmp_path):
    refs, inst = _write_refs(tmp_path, image_id=42, boxes_xywh=[[10, 20, 30, 40], [0, 0, 5, 5]])
    ex = read_task("refcoco+", [refs, inst], split="train")
    # two refs in split train, two sentences each: one example per sentence
    assert [e.text for e in ex] == ["thing 0 on the left", "thing 0, left", "thing 1 on the right", "thing 1, right"]
    assert ex[0].label == [10.0, 20.0, 40.0, 60.0]  # xywh → xyxy
    assert ex[0].images == ["42"] and ex[0].prefer[0][0] == "img42.jpg"
    assert len(read_task("refcoco", [refs, inst], split="val")) == 1
    with pytest.raises(ContractError, match="no refcoco examples in split 'testB'"):
        read_task("refcoco", [refs, inst], split="testB")


def test_refcoco_simple_json(tmp_path):
    f = tmp_path / "refs.json"
    f.write_text(json.dumps([{"image": "x.jpg", "expression": "the dog", "box": [1, 2, 3, 4]},
                             {"image": "y.jpg", "expression": "a cat", "bbox_xywh": [1, 2, 3, 4]}]))  # fmt: skip
    a, b = read_task("refcoco", [f])
    assert a.label == [1.0, 2.0, 3.0, 4.0] and b.label == [1.0, 2.0, 4.0, 6.0]


def test_retrieval_flickr30k_entities_strips_markup(fx):
    ex = read_task("retrieval", [fx / "flickr30k/tiny-dev.txt"])
    assert len(ex) == 15 and {e.images[0] for e in ex} == {"1", "2", "3"}
    assert ex[0].text.startswith("A girl with brown hair sits on the edge of a cement area")
    assert strip_entities("[/EN#1/people A girl] sits on [/EN#2/other a ledge] .") == "A girl sits on a ledge ."


def test_retrieval_karpathy_and_flickr8k(tmp_path, shared_data):
    k = tmp_path / "dataset_flickr8k.json"
    k.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}, {"raw": "a brown dog"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "a cat"}]}]}))  # fmt: skip
    assert [e.text for e in read_task("retrieval", [k], split="test")] == ["a dog", "a brown dog"]
    ex = read_task("retrieval", [shared_data / "flickr8k/captions.tsv"], split="dev")
    assert len(ex) == 5000 and len({e.images[0] for e in ex}) == 1000


# ---------------------------------------------------------------- malformed files: one-line errors


@pytest.mark.parametrize(
    "task,content,name,match",
    [
        ("vqa", '{"questions": [{"question_id": 1, "question": "q?"}]}', "q.json", r"row 1: field 'image_id': missing"),
        ("vqa", '{"questions": [', "q.json", r"field 'json': not valid JSON"),
        ("vqa", '{"info": {}}', "q.json", r"neither 'questions' nor 'annotations'"),
        ("nlvr2", '{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}\n', "n.jsonl", r"row 1: field 'label': 'maybe' is not True/False"),
        ("nlvr2", '{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}\n{"identifier": "oops", "sentence": "y", "label": "True"}\n',
         "n.jsonl", r"row 2: field 'identifier': 'oops' is not split-set-pair-sentence"),
        ("ve", '{"Flickr30K_ID": "1", "sentence2": "x", "gold_label": "-"}\n', "v.jsonl", r"row 1: field 'gold_label': '-' is not one of"),
        ("ve", '{"Flickr30K_ID": "1", "gold_label": "neutral"}\n', "v.jsonl", r"row 1: field 'sentence2': missing"),
        ("refcoco", '[{"image": "a.jpg", "expression": "dog", "box": [1, 2, 3]}]', "r.json", r"row 1: field 'box': expected 4 numbers"),
        ("retrieval", '[{"image": "a.jpg", "caption": ""}]', "c.json", r"row 1: field 'caption': empty"),
    ],
)  # fmt: skip
def test_malformed_task_files_fail_with_one_line(tmp_path, task, content, name, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ContractError, match=match) as e:
        read_task(task, [f])
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_vqa_annotation_without_its_question_is_an_error(tmp_path, fx):
    a = json.loads((fx / "vqav2/annotations.json").read_text())
    a["annotations"] = a["annotations"][:2]
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(a))
    with pytest.raises(ContractError, match="no annotation for question 458752002"):
        read_task("vqa", [fx / "vqav2/questions.json", f])


def test_cli_malformed_file_is_one_line_exit_2(tmp_path, capsys):
    from raysys.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Flickr30K_ID": "1", "sentence2": "x", "gold_label": "maybe"}\n')
    rc = main(["evaluate", "finetune", "--task", "ve", "--checkpoint", "base", "--train", str(bad), "--eval", str(bad),
               "--images", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "row 1: field 'gold_label'" in err, err


def test_image_references_resolve_across_spellings():
    from raysys.evaluate.downstream import ImageIndex

    idx = ImageIndex(["vqav2/COCO_train2014_000000458752.jpg", "flickr30k/6338542128.jpg", "dev-850-0-img0",
                      "a/1.jpg", "b/1.jpg"])  # fmt: skip
    assert idx.resolve("458752", ["COCO_train2014_000000458752"]) == "vqav2/COCO_train2014_000000458752.jpg"
    assert idx.resolve(6338542128) == "flickr30k/6338542128.jpg"
    assert idx.resolve("dev-850-0-img0") == "dev-850-0-img0"
    assert idx.resolve("1") is None  # ambiguous: two images are "1" — never guess
    assert idx.resolve("a/1.jpg") == "a/1.jpg"


# ---------------------------------------------------------------- fine-tuning end to end on the fixtures


@pytest.fixture(scope="module")
def task_images(tmp_path_factory, shared_data) -> dict[str, Path]:
    """The fixture images through the real stages: 8 photos through `featurize` (1280-d), the 8
    NLVR2 images from the shared LXMERT TSV through `import lxmert-tsv` (2048-d)."""
    from raysys.data.featurize import FeaturizeConfig, featurize
    from raysys.data.importers import import_lxmert_tsv

    root = tmp_path_factory.mktemp("task_images")
    img = shared_data / "task_fixtures" / "images"
    files = [img / "vqav2/COCO_train2014_000000458752.jpg", img / "visual_entailment/2248275918.jpg",
             img / "visual_entailment/402978771.jpg"] + [img / f"flickr30k/{i}.jpg" for i in
                                                          ("1", "2", "3", "6338542128", "4945942737")]  # fmt: skip
    featurize(FeaturizeConfig(), files, root / "photos", use_ray=False)
    lx = shared_data / "region_features_lxmert_tsv"
    import_lxmert_tsv(lx / "train.tsv", shared_data / "vg_vocab/objects_vocab.txt", root / "nlvr2")
    return {"photos": root / "photos", "nlvr2": root / "nlvr2"}


def _write_refs(root: Path, image_id: int, boxes_xywh: list[list[float]]) -> tuple[Path, Path]:
    """A RefCOCO+-layout fixture: refs(unc) as JSON + COCO instances, one ref per box, each ref in
    split train with two sentences, the first also once more in val."""
    anns = [{"id": 100 + k, "image_id": image_id, "bbox": b, "category_id": 1} for k, b in enumerate(boxes_xywh)]
    refs = []
    for k in range(len(boxes_xywh)):
        side = "left" if k % 2 == 0 else "right"
        refs.append({"ref_id": k, "ann_id": 100 + k, "image_id": image_id, "split": "train", "file_name": f"img{image_id}.jpg",
                     "sentences": [{"sent": f"thing {k} on the {side}", "sent_id": 2 * k},
                                   {"sent": f"thing {k}, {side}", "sent_id": 2 * k + 1}]})  # fmt: skip
    refs.append({**refs[0], "ref_id": 99, "split": "val", "sentences": [{"sent": "thing 0 again", "sent_id": 99}]})
    r, i = root / "refs(unc).json", root / "instances.json"
    r.write_text(json.dumps(refs))
    i.write_text(json.dumps({"images": [{"id": image_id, "width": 640, "height": 480}], "annotations": anns}))
    return r, i


def _refcoco_fixture(root: Path, photos: Path) -> tuple[Path, Path]:
    """Referring expressions on the featurized VQA photo (COCO id 458752): gold boxes are its
    detections moved by 2 px, expressions name the detected class and a side."""
    from raysys.evaluate.downstream import load_images

    im = load_images(photos, ["vqav2/COCO_train2014_000000458752.jpg"])
    boxes = im.image_boxes(0)[:-1]  # the detections (the last region is the whole image)
    xywh = [[float(b[0]) + 2, float(b[1]) + 2, float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes[:6]]
    return _write_refs(root, 458752, xywh)


def test_every_task_fine_tunes_on_its_fixture_and_lands_in_mlflow(task_images, shared_data, tmp_path):
    import mlflow
    import torch
    from _pretrain_fixtures import tiny_bert_folder

    from raysys.evaluate.finetune import FinetuneConfig, TaskRun, run_finetune
    from raysys.pretrain.model import ModelConfig, build_model, save_checkpoint

    fx = shared_data / "task_fixtures"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("pretrain")).info.run_id
    bert = tiny_bert_folder(tmp_path / "bert")
    ckpts = {}
    for dim in (1280, 2048):  # featurized photos / the LXMERT TSV
        model = build_model(ModelConfig(model_path=str(bert), feature_dim=dim, num_classes=80), seed=0)
        ckpts[dim] = tmp_path / f"model{dim}.pt"
        save_checkpoint(ckpts[dim], model, {"recipe": "muvla", "mlflow_run_id": parent, "tracking_uri": uri})
    refs, inst = _refcoco_fixture(tmp_path, task_images["photos"])
    vqa = [str(fx / "vqav2/questions.json"), str(fx / "vqav2/annotations.json")]
    ve = [str(fx / "visual_entailment/sample_pairs.jsonl")]
    photos = str(task_images["photos"])
    runs = [
        TaskRun("vqa", vqa, vqa, photos),
        TaskRun("ve", ve, ve, photos),
        TaskRun("refcoco", [str(refs), str(inst)], [str(refs), str(inst)], photos),
        TaskRun("retrieval", [str(fx / "flickr30k/tiny-dev.txt")], [str(fx / "flickr30k/test.txt")], photos),
    ]
    cfg = FinetuneConfig(steps=3, log_every=0, items=True)
    torch.manual_seed(0)
    out = run_finetune(str(ckpts[1280]), cfg, runs)
    nl = run_finetune(str(ckpts[2048]), cfg, [TaskRun("nlvr2", [str(shared_data / "region_features_lxmert_tsv/instances_train.json")],
                                                      [str(fx / "nlvr2/tiny-dev.json")], str(task_images["nlvr2"]))])  # fmt: skip
    results = {**out["tasks"], **nl["tasks"]}
    assert set(results) == {"vqa", "ve", "refcoco", "retrieval", "nlvr2"}
    expect = {"vqa": ("vqa_accuracy", 3), "ve": ("accuracy", 16), "refcoco": ("accuracy", 1),
              "retrieval": ("r_mean", 25), "nlvr2": ("accuracy", 8)}  # fmt: skip
    for task, r in results.items():
        metric, n_eval = expect[task]
        assert r["headline"] == metric and 0.0 <= r["score"] <= 100.0, r
        assert r["n_eval_examples"] == n_eval and r["steps"] >= 1 and np.isfinite(r["final_loss"]), r
        run = client.get_run(r["mlflow"]["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["raysys.parent_run_id"] == parent and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.metrics[metric] == pytest.approx(r["score"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(r["steps"]))
        assert float(run.data.params[f"{task}.lr"]) > 0
        # each eval item's own score (what the report's paired bootstrap resamples); their mean is the
        # headline (retrieval: items are images, and every fixture image has 5 captions)
        items = r["items"]
        assert len(items["ids"]) == len(items["scores"]) == (n_eval // 5 if task == "retrieval" else n_eval), task
        assert np.mean(items["scores"]) == pytest.approx(r["score"], abs=0.01), task
        assert "items" not in run.data.params and not any(k.startswith("items") for k in run.data.metrics)
    assert results["vqa"]["num_answers"] == 6  # the distinct answers of the 3 questions: net netting mesh pitcher orange catcher
    assert results["refcoco"]["proposal_upper_bound"] == 100.0  # every gold box is a detection moved by 2 px
    # the meta-average of the four paper tasks is one more child run; the pre-training run is not written
    meta = client.get_run(out["mlflow"]["run_id"])
    assert meta.data.tags["mlflow.parentRunId"] == parent and not client.get_run(parent).data.metrics
    pm = meta.data.metrics
    assert pm["finetune.meta_average"] == pytest.approx(np.mean([results[t]["score"] for t in ("vqa", "ve", "refcoco")]), abs=1e-3)
    assert {f"finetune.{t}.score" for t in out["tasks"]} <= set(pm)
    assert out["meta_tasks"] == ["vqa", "ve", "refcoco"]


def test_cli_finetune_base_model(task_images, shared_data, tmp_path, capsys):
    """`raysys evaluate finetune --task ve --checkpoint base`: the un-pre-trained MiniLM, last line JSON."""
    from raysys.cli import main

    ve = str(shared_data / "task_fixtures/visual_entailment/sample_pairs.jsonl")
    rc = main(["evaluate", "finetune", "--task", "snli-ve", "--checkpoint", "base", "--train", ve, "--eval", ve,
               "--images", str(task_images["photos"]), "steps=1", "base_layers=1", "eval_batch_size=16",
               f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    res = json.loads(out[-1])
    assert res["tasks"]["ve"]["n_eval_examples"] == 16 and 0 <= res["scores"]["ve"] <= 100
    assert res["meta_average"] == res["scores"]["ve"]


def test_refs_without_instances_says_what_is_missing(tmp_path):
    refs, _ = _write_refs(tmp_path, image_id=1, boxes_xywh=[[0, 0, 2, 2]])
    with pytest.raises(ContractError, match="the refs format needs two files: refs JSON \\+ instances.json"):
        read_task("refcoco", [refs])


def test_retrieval_chance_is_what_random_scores_get():
    """The R-mean a random ranking scores per image (the report's chance line), against random
    score matrices ranked by the metric's own gold_ranks; uneven caption counts included."""
    rng = np.random.default_rng(0)
    text_img = np.array([0] * 5 + [1] * 5 + [2] * 3 + [3] * 5 + [4] * 1 + [5] * 5 + [6] * 5 + [7] * 5)
    images = np.arange(8)
    gold = text_img[None, :] == images[:, None]
    got = []
    for _ in range(3000):
        S = rng.random(gold.shape)
        i2t, t2i = gold_ranks(S, gold), gold_ranks(S.T, gold.T)
        h_i = np.mean([i2t <= k for k in (1, 5, 10)], axis=0)
        h_t = np.mean([t2i <= k for k in (1, 5, 10)], axis=0)
        got.append(np.mean([50.0 * (h_i[a] + h_t[text_img == a].mean()) for a in images]))
    assert chance_r_mean(text_img, images) == pytest.approx(np.mean(got), abs=0.5)
    assert chance_r_mean(np.repeat(np.arange(100), 5), np.arange(100)) == pytest.approx(5.26, abs=0.01)
