"""The downstream suite (`raysys evaluate suite`) and the report's statistics: the JSON schema on a
tiny world, per-item scores whose mean is the headline, the paired bootstrap, the bold rule and
the directions on hand-made inputs, and (slow) that the suite's meta-average can tell true-pair
pre-training from no pre-training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from raysys.cli import main
from raysys.config import ConfigError
from raysys.data.world import WorldConfig, write_world
from raysys.evaluate.suite import SuiteConfig, suite_runs
from raysys.experiments.report import (
    best_row,
    chance_levels,
    directions,
    headline,
    markdown_table,
    paired_bootstrap,
    tables,
    write_report,
)

TASKS = ["vqa", "nlvr2", "ve", "refcoco", "retrieval"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "data"
    write_world(WorldConfig(images=80, seed=3, feature_dim=64, eval_fraction=0.5, tasks_per_image=2, workers=1), out)
    return out


def test_evaluate_suite_prints_scores_and_a_json_line(tiny_world, tmp_path, capsys):
    items = tmp_path / "items.json"
    rc = main(["evaluate", "suite", "--checkpoint", "base", "--data", str(tiny_world), "--items-out", str(items),
               "steps=2", "batch_size=8", "base_layers=1", "retrieval_eval_images=4", "threads=1", "eval_batch_size=32"])  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) == {"meta_average", *TASKS, "n_eval", "steps", "seconds"}
    assert out["steps"] == 2 and set(out["n_eval"]) == set(TASKS)
    for t in TASKS:
        assert 0.0 <= out[t] <= 100.0 and any(line.startswith(t) for line in lines[:-1])
    assert out["meta_average"] == pytest.approx(np.mean([out[t] for t in ("vqa", "nlvr2", "ve", "refcoco")]), abs=1e-3)
    doc = json.loads(items.read_text())
    assert doc["budget"]["steps"] == 2 and doc["budget"]["lr"] == SuiteConfig().lr
    for t in TASKS:  # each item's score; their mean is the headline (retrieval: 5 captions per image)
        it = doc["items"][t]
        assert len(it["ids"]) == len(it["scores"]) == out["n_eval"][t] > 0 and len(set(it["ids"])) == len(it["ids"])
        assert np.mean(it["scores"]) == pytest.approx(out[t], abs=0.01)


def test_repeats_average_each_item_over_fine_tuning_seeds(tiny_world):
    """`repeats: 2` fine-tunes each task with seeds 0 and 1: each item's score, each task's score and
    the meta-average are the means of the two single-seed runs, whose scores differ (so a repeat that
    reused one seed, or kept one draw, fails)."""
    from raysys.evaluate.suite import run_suite

    common = dict(tasks=["vqa", "ve", "refcoco"], steps=3, lr=1e-3, batch_size=8, base_layers=1, threads=1)
    one = [run_suite("base", tiny_world, SuiteConfig(**common, seed=s)) for s in (0, 1)]
    both = run_suite("base", tiny_world, SuiteConfig(**common, repeats=2))
    assert any(one[0]["items"][t]["scores"] != one[1]["items"][t]["scores"] for t in common["tasks"])
    for t in common["tasks"]:
        want = [(a + b) / 2 for a, b in zip(one[0]["items"][t]["scores"], one[1]["items"][t]["scores"])]
        assert both["items"][t]["ids"] == one[0]["items"][t]["ids"]
        assert both["items"][t]["scores"] == pytest.approx(want)
        assert both["tasks"][t]["repeat_scores"] == [one[0]["scores"][t], one[1]["scores"][t]]
        assert both["scores"][t] == pytest.approx(np.mean(want), abs=1e-3)
    assert both["meta_average"] == pytest.approx((one[0]["meta_average"] + one[1]["meta_average"]) / 2, abs=1e-3)
    assert both["budget"]["repeats"] == 2
    with pytest.raises(ConfigError, match="repeats"):
        run_suite("base", tiny_world, SuiteConfig(**common, repeats=0))


def test_suite_config_errors_are_one_line(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="unknown 'gqa'"):
        suite_runs(tiny_world, SuiteConfig(tasks=["vqa", "gqa"]))
    assert [r.task for r in suite_runs(tiny_world, SuiteConfig(tasks=["snli-ve", "refcoco+"]))] == ["ve", "refcoco"]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="no downstream suite"):
        suite_runs(tmp_path / "bare", SuiteConfig())
    (tmp_path / "bare" / "manifest.json").write_text(json.dumps({"downstream": {"tasks": {"vqa": {}}}}))
    with pytest.raises(ConfigError, match="'ve' is not in .* suite; it has \\['vqa'\\]"):
        suite_runs(tmp_path / "bare", SuiteConfig(tasks=["ve"]))


def test_task_files_can_take_their_eval_photos_from_another_dataset(tiny_world, tmp_path, capsys):
    """`task_files.<task>.eval_images`: held-out photos in a dataset of their own (Flickr8k dev beside
    a train-only pre-training dataset). The same photos there give the same score; a dataset
    without them is an error naming it."""
    rec = json.loads((tiny_world / "manifest.json").read_text())["downstream"]["tasks"]["retrieval"]
    other = tmp_path / "dev_photos"
    shutil.copytree(tiny_world / "images", other / "images")
    shutil.copy(tiny_world / "manifest.json", other / "manifest.json")
    files = {"train": rec["train"], "eval": rec["eval"], "format": rec["format"]}
    runs = suite_runs(tiny_world, SuiteConfig(tasks=["retrieval"], task_files={"retrieval": {**files, "eval_images": str(other)}}))
    assert (runs[0].images, runs[0].eval_images) == (str(tiny_world), str(other))
    args = ["evaluate", "suite", "--checkpoint", "base", "--data", str(tiny_world), "tasks=[retrieval]", "steps=2",
            "batch_size=6", "base_layers=1", "retrieval_eval_images=4", "threads=1"]  # fmt: skip
    scores = []
    for where in (None, other):
        over = [f"task_files={json.dumps({'retrieval': {**files, **({'eval_images': str(where)} if where else {})}})}"]
        assert main([*args, *over]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["retrieval"])
    assert scores[0] == scores[1]
    shutil.rmtree(other / "images")
    (other / "images").mkdir()
    over = f"task_files={json.dumps({'retrieval': {**files, 'eval_images': str(other)}})}"
    assert main([*args, over]) != 0
    assert str(other) in capsys.readouterr().err


# ---------------------------------------------------------------- the report's statistics on hand-made inputs


def _items(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {t: {f"{t}{i}": s for i, s in enumerate(v)} for t, v in scores.items()}


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = {t: list(rng.uniform(0, 100, 300)) for t in ("vqa", "ve")}
    shifted = {t: [s + 5 for s in v] for t, v in base.items()}
    point, lo, hi = paired_bootstrap(_items(shifted), _items(base), ["vqa", "ve"])
    assert point == pytest.approx(5) and lo == pytest.approx(5) and hi == pytest.approx(5)  # every item +5
    noisy = {t: [s + rng.normal(0, 20) for s in v] for t, v in base.items()}
    point, lo, hi = paired_bootstrap(_items(noisy), _items(base), ["vqa", "ve"])
    assert lo < point < hi and lo < 0 < hi  # pure noise: the interval covers 0
    # a task-level gain of 10 on one of two tasks is a meta-average gain of 5
    one = {"vqa": [s + 10 for s in base["vqa"]], "ve": base["ve"]}
    assert paired_bootstrap(_items(one), _items(base), ["vqa", "ve"])[0] == pytest.approx(5)
    assert paired_bootstrap(_items(one), {"gqa": {"x": 1.0}}, ["vqa"]) is None  # no common item


def _run(axis: str, variant: str, seed: int, items: dict[str, list[float]]) -> dict:
    meta = float(np.mean([np.mean(v) for t, v in items.items() if t != "retrieval"]))
    doc = {"budget": {"steps": 7}, "items": {t: {"ids": [f"{t}{i}" for i in range(len(v))], "scores": v}
                                             for t, v in items.items()}}  # fmt: skip
    return {"axis": axis, "variant": variant, "seed": str(seed), "metrics": {"ft.meta_average": meta},
            "run_id": f"{axis}{variant}{seed}", "params": {}, "zeroshot_skipped": "", "items": doc}  # fmt: skip


def _correct(n: int, p: float, seed: int) -> list[float]:
    return list(100.0 * (np.random.default_rng(seed).random(n) < p))


def test_bold_only_when_the_interval_excludes_the_next_best():
    close = [_run("recipe", "base", 0, {"ve": _correct(200, 0.50, 1)}),
             _run("recipe", "muvla", 0, {"ve": _correct(200, 0.52, 2)})]  # fmt: skip
    assert best_row(tables(close)["recipe"], "ft.meta_average") is None  # 2 points on 200 items: a tie
    far = [_run("recipe", "base", 0, {"ve": _correct(200, 0.40, 1)}),
           _run("recipe", "muvla", 0, {"ve": [min(100.0, s + 100 * (i % 3 == 0)) for i, s in enumerate(_correct(200, 0.4, 1))]})]  # fmt: skip
    rows = tables(far)["recipe"]
    assert rows[best_row(rows, "ft.meta_average")]["variant"] == "muvla"


def test_directions_verdicts():
    n, good, bad = 400, 0.7, 0.4
    runs = [_run("recipe", "base", 0, {"ve": _correct(n, bad, 1)}),
            _run("recipe", "round_robin", 0, {"ve": _correct(n, 0.55, 2)}),
            _run("recipe", "muvla", 0, {"ve": _correct(n, good, 3)}),
            _run("recipe", "random_pairs", 0, {"ve": _correct(n, 0.9, 4)}),  # beats retrieved: reversed
            _run("w_itm", "with w_ITM", 0, {"ve": _correct(n, 0.6, 5)}),
            _run("w_itm", "without w_ITM", 0, {"ve": _correct(n, 0.6, 5)})]  # identical: inconclusive
    for r, p in zip((0.0, 0.5, 1.0), (0.3, 0.5, 0.8)):
        runs.append(_run("paired_ratio", str(r), 0, {"ve": _correct(n, p, 10 + int(10 * r))}))
    got = {d.split(" (")[0]: v for d, v, _ in directions(tables(runs))}
    assert got == {"retrieved pairs > random pairs": "reversed", "all three granularities ≥ each alone": "not run",
                   "K = 5 > K = 1": "not run", "w_ITM helps": "inconclusive", "paired ratio monotonic": "reproduced",
                   "μ-VLA > U-VisualBERT > Base": "reproduced"}  # fmt: skip


def test_a_retrieval_only_sweep_is_compared_on_its_retrieval_score():
    """A Flickr8k sweep runs no meta-average task: Δ vs base and the directions use its retrieval
    score (before, every direction read "not run")."""
    n = 400

    def run(variant: str, p: float, seed: int) -> dict:
        r = _run("recipe", variant, 0, {"retrieval": _correct(n, p, seed)})
        r["metrics"] = {"ft.retrieval.r_mean": float(np.mean(r["items"]["items"]["retrieval"]["scores"]))}
        return r

    tabs = tables([run("base", 0.3, 1), run("round_robin", 0.5, 2), run("muvla", 0.7, 3), run("random_pairs", 0.7, 4)])
    rows = tabs["recipe"]
    assert headline(rows) == "ft.retrieval.r_mean"
    got = {d.split(" (")[0]: v for d, v, _ in directions(tabs, headline(rows))}
    assert got["μ-VLA > U-VisualBERT > Base"] == "reproduced"
    assert got["retrieved pairs > random pairs"] == "inconclusive"  # the same rate: a tie
    table = markdown_table(rows, rows[0], headline(rows))
    assert "Δ Retr. R-mean vs base" in table.splitlines()[0]
    muvla = next(line for line in table.splitlines() if line.startswith("| muvla"))
    assert muvla.rstrip(" |").split("|")[-1].strip().startswith("+")  # muvla − base: about +40 points
    # retrieval's chance depends on the eval size: the plot draws what the trials logged, or nothing
    runs = [run("base", 0.3, 1), run("muvla", 0.7, 3)]
    assert "ft.retrieval.r_mean" not in chance_levels(runs)
    for r in runs:
        r["metrics"]["ft.retrieval.chance_r_mean"] = 5.26
    assert chance_levels(runs)["ft.retrieval.r_mean"] == pytest.approx(5.26)
    assert chance_levels(runs)["ft.nlvr2.accuracy"] == 50.0


def test_report_from_mlflow_with_items(tmp_path):
    """Seeds average (± only with 2+ seeds), Δ vs base with its interval, the directions section,
    plots titled with eval size, steps and seeds."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("s")
    for variant, p, seeds in [("base", 0.4, (0, 1)), ("muvla", 0.8, (0, 1)), ("round_robin", 0.6, (0,))]:
        for seed in seeds:
            run = _run("recipe", variant, seed, {"ve": _correct(300, p, seed + 7), "nlvr2": _correct(300, p, seed + 9)})
            rid = client.create_run(exp, tags={"raysys.axis": "recipe", "raysys.variant": variant,
                                               "raysys.seed": str(seed)}).info.run_id  # fmt: skip
            client.log_metric(rid, "ft.meta_average", run["metrics"]["ft.meta_average"])
            if variant == "base":
                client.set_tag(rid, "zeroshot.skipped_reason", "recipe base does not pre-train")
            else:
                client.log_metric(rid, "zeroshot.t2i_r5", 10.0)
            f = tmp_path / f"{rid}" / "suite_items.json"
            f.parent.mkdir()
            f.write_text(json.dumps(run["items"]))
            client.log_artifact(rid, str(f))
            client.set_terminated(rid)
    res = write_report(uri, "s", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "seeds" not in ln}
    assert " ± " in lines["muvla"] and " ± " not in lines["round_robin"].split("|")[3]  # one seed: no ±
    assert "null" in lines["base"]  # zero-shot of a recipe without ITM training
    assert "**" in lines["muvla"].split("|")[3]  # +40 points over 600 items: bold
    delta = lines["muvla"].split("|")[-2].strip()
    point, lo, hi = (float(x) for x in delta.replace("[", "").replace("]", "").replace(",", "").split())
    assert 30 < lo < point < hi < 50
    assert "## Directions" in md and res["directions"]["μ-VLA > U-VisualBERT > Base (Table 1)"] == "reproduced"
    assert res["plots"] == ["recipe.png"] and (tmp_path / "rep" / "recipe.png").stat().st_size > 10_000


# ---------------------------------------------------------------- the metric can tell (a learning claim)


def test_the_separation_bench_scores_both_ends_and_resumes(tmp_path, capsys):
    """`raysys bench separation` (issue 17's gate, ~30 min at its settings) at toy size: base and
    true-pair pre-training on one suite budget, the paired bootstrap of their difference, a re-run
    that reuses the world and both checkpoints, and a refusal to reuse them for another world."""
    argv = ["bench", "separation", "--work", str(tmp_path), "--images", "80", "--eval-fraction", "0.5",
            "--pretrain", "steps=2", "model_layers=1", "lr=5e-4", "--suite", "steps=1", "batch_size=4", "tasks=[ve,refcoco]"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["base"]) == set(res["paired"]) == {"meta_average", "ve", "refcoco"}  # the tasks asked for
    lo, hi = res["ci95"]
    assert lo <= res["delta"] <= hi and res["separates"] == (lo > 0)
    assert res["delta"] == pytest.approx(res["paired"]["meta_average"] - res["base"]["meta_average"], abs=0.02)
    assert res["suite"]["steps"] == 1 and res["pretrain"]["steps"] == 2 and res["pretrain"]["lr"] == 5e-4  # as parsed
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "base" / "model.pt", tmp_path / "paired" / "model.pt")}
    assert main(argv) == 0 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["delta"] == res["delta"]  # same inputs
    assert main([*argv[:5], "81", *argv[6:]]) == 2  # another world asked of the same --work: refused, kept
    assert "not {'images': 81" in capsys.readouterr().err and (tmp_path / "paired" / "model.pt").exists()


def test_a_sweep_trials_metrics(tiny_world):
    """What a sweep trial reports after pre-training (the Tune trial minus Tune): `ft.*`, the items
    as JSON for the MLflow artifact, and for a recipe without ITM training the reason, no zero-shot."""
    from raysys.experiments.sweep import trial_metrics
    from raysys.pretrain.config import TrainConfig

    suite = {"tasks": ["ve", "retrieval"], "steps": 1, "batch_size": 4, "base_layers": 1, "retrieval_eval_images": 4}
    m = trial_metrics(TrainConfig(recipe="base"), "base", str(tiny_world), {"suite": suite, "zeroshot": {}})
    assert {"ft.meta_average", "ft.ve.accuracy", "ft.retrieval.r_mean", "ft.ve.n_eval"} <= set(m)
    assert m["ft.meta_average"] == m["ft.ve.accuracy"]  # the meta-average over the paper tasks run
    assert "does not pre-train" in m["zeroshot_skipped_reason"] and not any(k.startswith("zeroshot.") for k in m)
    doc = json.loads(m["suite_items"])
    assert set(doc["items"]) == {"ve", "retrieval"} and doc["budget"]["steps"] == 1
    assert len(doc["items"]["ve"]["ids"]) == m["ft.ve.n_eval"]
