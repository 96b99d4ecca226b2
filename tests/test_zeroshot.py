"""Zero-shot image↔text retrieval with the ITM head: the result contract, Ray sharding, the coarse
stage, the CLI and MLflow, the pipeline stage, and (slow) the learnability margins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _pretrain_fixtures import tiny_bert_folder

from raysys.contract import ContractError
from raysys.evaluate.zeroshot import REQUIRED_KEYS, ZeroShotConfig, evaluate_zeroshot

TIMING = {"seconds", "pairs_per_s", "workers", "ray", "mlflow"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A small random model (32 wide, 2 layers) for the demo world's 2048-d features."""
    from raysys.pretrain.model import ModelConfig, build_model, save_checkpoint

    d = tmp_path_factory.mktemp("zs_ckpt")
    bert = tiny_bert_folder(d / "bert")
    model = build_model(ModelConfig(model_path=str(bert), feature_dim=2048, num_classes=80), seed=0)
    save_checkpoint(d / "run" / "model.pt", model, {"recipe": "muvla", "pretrain_config": {"model_layers": 1}})
    return d / "run" / "model.pt"


def _check(r: dict, n_images: int, n_texts: int) -> None:
    assert set(REQUIRED_KEYS) <= set(r)
    assert r["n_images"] == n_images and r["n_texts"] == n_texts
    for d in ("i2t", "t2i"):
        assert 0 <= r[f"{d}_r1"] <= r[f"{d}_r5"] <= r[f"{d}_r10"] <= 100
        assert 1 <= r[f"{d}_median_rank"] and 1 <= r[f"{d}_mean_rank"]
    assert 0 <= r["itm_auc"] <= 1


def test_full_scoring_on_the_world(small_world, tiny_ckpt):
    r = evaluate_zeroshot(str(tiny_ckpt), small_world, ZeroShotConfig(max_images=6, mlflow=False, ray="never"))
    _check(r, 6, 30)  # 5 gold captions per image
    assert r["n_pairs_scored"] == r["n_pairs_full"] == 6 * 30 and r["coarse_used"] is False
    assert r["t2i_r10"] == 100.0  # only 6 candidate images
    assert r["chance_t2i_r5"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    again = evaluate_zeroshot(str(tiny_ckpt), small_world, ZeroShotConfig(max_images=6, mlflow=False, ray="never"))
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in r.items() if k not in TIMING}


def test_ray_actors_score_the_same_as_one_process(small_world, tiny_ckpt, ray_session):
    common = {"max_images": 5, "mlflow": False, "chunk_pairs": 40}
    local = evaluate_zeroshot(str(tiny_ckpt), small_world, ZeroShotConfig(ray="never", **common))
    sharded = evaluate_zeroshot(str(tiny_ckpt), small_world,
                                ZeroShotConfig(ray="always", workers=2, cpus_per_worker=0.5, **common))  # fmt: skip
    assert sharded["ray"] is True and sharded["workers"] == 2 and local["ray"] is False
    _check(sharded, 5, 25)
    for k, v in local.items():  # 4 chunks over 2 actors, merged back in order: same ranks, same AUC
        if k not in TIMING and k != "device":
            assert sharded[k] == (pytest.approx(v, abs=1e-3) if isinstance(v, float) else v), k


def test_coarse_stage_is_reported_and_caps_recall(small_world, tiny_ckpt):
    r = evaluate_zeroshot(str(tiny_ckpt), small_world,
                          ZeroShotConfig(max_images=10, coarse="tags", coarse_top_n=5, mlflow=False, ray="never"))  # fmt: skip
    _check(r, 10, 50)
    assert r["coarse_used"] is True and r["coarse"] == "tags" and r["coarse_top_n"] == 5
    assert r["n_pairs_scored"] < r["n_pairs_full"] == 500
    # ranks beyond the top 5 come from the coarse order: R@5 cannot beat the coarse stage's recall@5
    assert r["i2t_r5"] <= r["coarse_i2t_recall"] and r["t2i_r5"] <= r["coarse_t2i_recall"]
    assert r["coarse_t2i_recall"] > 50.0  # tag queries find the gold image of most captions


def test_missing_split_is_a_one_line_error(small_world, tiny_ckpt):
    with pytest.raises(ContractError, match=r"no gold pairs in split 'dev' \(splits here: \['eval', 'train'\]\)"):
        evaluate_zeroshot(str(tiny_ckpt), small_world, ZeroShotConfig(split="dev", mlflow=False))


def test_cli_base_prints_the_json_and_logs_to_mlflow(small_world, tmp_path, capsys):
    import mlflow

    from raysys.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["evaluate", "zeroshot", "--checkpoint", "base", "--data", str(small_world), "max_images=3",
               "base_layers=1", "ray=never", f"tracking_uri={uri}", "experiment=zs-test"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and "t2i_r5" in out[0]  # the table, then the JSON
    r = json.loads(out[-1])
    _check(r, 3, 15)
    assert r["checkpoint"] == "base" and r["coarse_used"] is False
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(r["mlflow"]["run_id"])
    assert run.data.metrics["zeroshot.t2i_r5"] == pytest.approx(r["t2i_r5"]) and run.info.status == "FINISHED"


def test_pipeline_stage_compares_with_base_in_a_child_of_the_pretraining_run(small_world, tiny_ckpt, tmp_path):
    import mlflow

    from raysys.evaluate.zeroshot import zeroshot_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    parent = c.create_run(c.create_experiment("raysys-pretrain")).info.run_id
    c.set_terminated(parent, "FINISHED")  # as the pretrain stage leaves it
    pretrain = {"checkpoint": str(tiny_ckpt.parent), "mlflow_run_id": parent, "tracking_uri": uri}  # a checkpoint dir
    out = zeroshot_stage(ZeroShotConfig(max_images=3, ray="never"), small_world, pretrain)
    assert {"pretrained", "base"} <= set(out)
    for name in ("pretrained", "base"):
        _check(out[name], 3, 15)
    assert out["base"]["checkpoint"] == "base" and out["pretrained"]["checkpoint"] == str(tiny_ckpt.parent)
    assert out["margin_t2i_r5"] == pytest.approx(out["pretrained"]["t2i_r5"] - out["base"]["t2i_r5"])
    child = c.get_run(out["mlflow"]["run_id"])  # one new child run; the pre-training run is not written
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.params["zeroshot.base.checkpoint"] == "base"
    m = child.data.metrics
    assert m["zeroshot.t2i_r5"] == pytest.approx(out["pretrained"]["t2i_r5"])
    assert m["zeroshot.base.t2i_r5"] == pytest.approx(out["base"]["t2i_r5"])
    assert not c.get_run(parent).data.metrics
    with pytest.raises(Exception, match="no pre-trained checkpoint"):
        zeroshot_stage(ZeroShotConfig(), small_world, {})

    # the pipeline's last stage: report.md from the summary, logged into the same run
    from raysys.experiments.pipeline import PipelineConfig, stage_report

    summary = {"pretrain": {**pretrain, "steps": 3, "final_loss": 1.25, "components": {"is.itm": 0.5}}, "zeroshot": out}
    stage_report(PipelineConfig(), tmp_path, summary)
    md = (tmp_path / "report.md").read_text()
    assert summary["report"] == {"path": str(tmp_path / "report.md"), "mlflow_artifact": True}
    row = next(line for line in md.splitlines() if line.startswith("pretrained"))
    assert f"{out['pretrained']['t2i_r5']:.1f}" in row and "| is.itm | 0.500 |" in md and "final loss 1.250" in md
    assert [a.path for a in c.list_artifacts(parent)] == ["report.md"]


@pytest.mark.slow
def test_flickr8k_dev_bench(shared_data, tmp_path, capsys):
    """`raysys bench zeroshot-flickr8k` end to end on real photos, sized for the test suite: 100
    featurized dev photos × their 500 captions after a small pre-training on 100 train photos,
    printing R@1/5/10 for the pre-trained model and base. The full 1,000 × 5,000 dev set is the
    bench's own run (its figures: the "Flickr8k dev zero-shot (bench)" section of docs/evaluation.md)."""
    from raysys.cli import main

    rc = main(["bench", "zeroshot-flickr8k", "--flickr", str(shared_data / "flickr8k"), "--work", str(tmp_path / "w"),
               "--train-images", "100", "--eval-images", "100", "--steps", "12", "--batch-size", "16",
               "--coarse-top-n", "3"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    r = json.loads(out[-1])
    assert r["n_images"] == 100 and r["n_texts"] == 500 and r["coarse_used"] is True
    for side in ("pretrained", "base"):
        assert all(0 <= r[side][k] <= 100 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
        # candidates rank first, so a hit at rank 1 is a coarse hit (coarse leftovers may fill ranks 4-5)
        assert r[side]["t2i_r1"] <= r[side]["coarse_t2i_recall"] and r[side]["i2t_r1"] <= r[side]["coarse_i2t_recall"]
    assert any(line.startswith("pretrained") for line in out) and any(line.startswith("base") for line in out)
