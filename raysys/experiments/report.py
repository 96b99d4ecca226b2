"""`raysys report`: read a sweep's MLflow experiment and write a paper-style `report.md` + PNG plots.

The report is rebuilt from MLflow alone (not from Tune's files), so it works for any sweep whose
trial runs carry the tags the sweep sets:

- `raysys.axis`: the ablation axis the trial belongs to (`K`, `m`, `granularities`, `w_itm`,
  `recipe`, `mixing`, `paired_ratio`, or `grid` for a full grid),
- `raysys.variant`: the value on that axis, as text,
- `raysys.seed`: the trial's seed (tables average over it: mean ± std; one seed prints no ±).

The headline is the fine-tuned downstream suite (`ft.meta_average`, `ft.<task>.<metric>`), as in
the paper; zero-shot retrieval (`zeroshot.*`, or the bare names of older sweeps) is an extra
column, empty for recipes that do not train the ITM head. Honesty rules:

- **Differences from `base`** (the `recipe` axis's `base` rows) come with a 95 % paired bootstrap
  interval over evaluation items: every trial scored the same items (the suite's
  `suite_items.json` artifact), so each item's score difference is resampled, task by task, and
  the meta-average of the resampled task means is taken.
- **Bold** marks a table's best row only when the interval of its difference from the next best
  row excludes 0; a column without per-item scores (zero-shot) is never bold.
- **Plots** draw the chance level and name the evaluation size, the fine-tuning steps and the
  number of seeds.
- **Directions**: for each direction the paper reports, whether this run reproduces it
  (`reproduced` when the interval excludes 0 in the paper's direction, `reversed` when it excludes
  0 the other way, `inconclusive` otherwise, `not run` when a row is missing).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from raysys import tracking
from raysys.config import ConfigError
from raysys.evaluate.metrics import CHANCE as TASK_CHANCE
from raysys.evaluate.metrics import META_TASKS

AXIS_TITLES = {
    "recipe": "Baselines (paper Tables 1, 3)",
    "granularities": "Pre-training granularities (paper Table 2)",
    "w_itm": "Weighted ITM (paper Table 4)",
    "mixing": "Round-robin vs joint batches (paper Table 5)",
    "paired_ratio": "Paired ratio r of true pairs (paper Table 6, Fig. 1)",
    "K": "Retrieved sentences per image K (paper Fig. 3)",
    "m": "Curriculum warm-up epochs m (paper §3.4)",
    "grid": "Full grid",
}
META = "ft.meta_average"
FT_METRICS = [(META, "Meta-Ave"), ("ft.vqa.vqa_accuracy", "VQA"), ("ft.nlvr2.accuracy", "NLVR2"),
              ("ft.ve.accuracy", "VE"), ("ft.refcoco.accuracy", "RefCOCO+"), ("ft.retrieval.r_mean", "Retr. R-mean")]  # fmt: skip
ZS_METRICS = [("zeroshot.t2i_r5", "ZS T→I R@5"), ("zeroshot.i2t_r5", "ZS I→T R@5"), ("zeroshot.itm_auc", "ZS ITM AUC"),
              ("t2i_r1", "T→I R@1"), ("t2i_r5", "T→I R@5"), ("t2i_r10", "T→I R@10"), ("i2t_r1", "I→T R@1"),
              ("i2t_r5", "I→T R@5"), ("i2t_r10", "I→T R@10"), ("itm_auc", "ITM AUC")]  # fmt: skip
METRICS = FT_METRICS + ZS_METRICS
#: metric → the suite task whose items it averages (None: the meta-average over META_TASKS)
ITEM_TASK: dict[str, str | None] = {META: None, **{k: k.split(".")[1] for k, _ in FT_METRICS[1:]}}
#: scored by guessing (percent), per task (raysys.evaluate.metrics.CHANCE); retrieval's depends on the
#: eval size, so each trial logs its own (`RETRIEVAL_CHANCE`, see `chance_levels`)
CHANCE = {k: TASK_CHANCE[ITEM_TASK[k]] for k, _ in FT_METRICS[1:5]}
CHANCE[META] = float(np.mean([CHANCE[k] for k, _ in FT_METRICS[1:5]]))
RETRIEVAL_CHANCE = ("ft.retrieval.r_mean", "ft.retrieval.chance_r_mean")
BOOTSTRAP = 2000


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _sort_key(v: str):
    n = _num(v)
    return (0, n, "") if n is not None else (1, 0.0, v)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


# ---------------------------------------------------------------- reading MLflow


def _items(client, run_id: str) -> dict[str, Any] | None:
    """The trial's `suite_items.json` artifact (each eval item's score per task), or None."""
    try:
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(client.download_artifacts(run_id, "suite_items.json", d)).read_text())
    except Exception:  # noqa: BLE001 - a trial without items (zero-shot sweep, older sweep) has no intervals
        return None


def load_runs(tracking_uri: str, experiment: str) -> tuple[list[dict[str, Any]], Any]:
    """Finished trial runs of the experiment as plain dicts (with their per-item suite scores),
    and the sweep's parent run (or None)."""
    client = mlflow.MlflowClient(tracking_uri=tracking.require_store(tracking_uri))  # never a new empty store
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"{tracking.redact(tracking_uri)}: no MLflow experiment named {experiment!r} "
                          f"(experiments there: {', '.join(repr(n) for n in names) or 'none'})")  # fmt: skip
    runs, parent = [], None
    for r in client.search_runs([exp.experiment_id], max_results=50_000):
        tags = r.data.tags
        if tags.get("raysys.role") == "sweep":
            parent = r
            continue
        if "raysys.axis" not in tags or r.info.status != "FINISHED":
            continue
        runs.append({"axis": tags["raysys.axis"], "variant": tags.get("raysys.variant", ""),
                     "seed": tags.get("raysys.seed", ""), "metrics": dict(r.data.metrics), "run_id": r.info.run_id,
                     "params": dict(r.data.params), "zeroshot_skipped": tags.get("zeroshot.skipped_reason", ""),
                     "trial": tags.get("raysys.trial", ""), "same_as": tags.get("raysys.same_as", ""),
                     "items": _items(client, r.info.run_id)})  # fmt: skip
    return runs, (client, parent)


# ---------------------------------------------------------------- per-item statistics


def item_scores(group: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """task → item id → score, averaged over the group's seeds (None when a run has no items)."""
    if not group or any(not g.get("items") for g in group):
        return None
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g in group:
        for task, it in g["items"]["items"].items():
            for i, s in zip(it["ids"], it["scores"]):
                acc[task][i].append(float(s))
    return {t: {i: float(np.mean(v)) for i, v in d.items()} for t, d in acc.items()}


def paired_bootstrap(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], tasks: list[str],
                     n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float] | None:  # fmt: skip
    """(mean of a − b, 2.5 %, 97.5 %): the mean over `tasks` of each task's mean item difference,
    items resampled with replacement within each task. Only items both score are compared."""
    rng = np.random.default_rng(seed)
    diffs = []
    for t in tasks:
        common = sorted(set(a.get(t, {})) & set(b.get(t, {})))
        if not common:
            continue
        diffs.append(np.array([a[t][i] - b[t][i] for i in common]))
    if not diffs:
        return None
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.mean([d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1) for d in diffs], axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def headline(rows: list[dict[str, Any]]) -> str:
    """The fine-tuned metric the Δ column, the directions and the plots compare on: the paper's
    meta-average where the trials ran its tasks, else the first task score they have (a Flickr8k
    sweep has retrieval only: `ft.retrieval.r_mean`)."""
    return next((k for k, _ in FT_METRICS if any(k in r["stats"] for r in rows)), META)


def metric_tasks(key: str, items: dict[str, dict[str, float]]) -> list[str]:
    task = ITEM_TASK.get(key, "")
    if task is None:
        return [t for t in META_TASKS if t in items]
    return [task] if task in items else []


def verdict(ci: tuple[float, float, float] | None, strict: bool = True) -> str:
    """`reproduced` when the interval excludes 0 in the paper's direction (for ≥: the point is
    ≥ 0 and the interval does not exclude 0 the other way), `reversed`, or `inconclusive`."""
    if ci is None:
        return "not run"
    point, lo, hi = ci
    if lo > 0 or (not strict and point >= 0 and hi >= 0):
        return "reproduced"
    if hi < 0:
        return "reversed"
    return "inconclusive"


# ---------------------------------------------------------------- tables


def tables(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """axis -> rows (variant, n seeds, {metric: (mean, std)}, per-item scores), variants in natural order."""
    by: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by[r["axis"]][r["variant"]].append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for axis in sorted(by, key=lambda a: list(AXIS_TITLES).index(a) if a in AXIS_TITLES else 99):
        rows = []
        for variant in sorted(by[axis], key=_sort_key):
            group = by[axis][variant]
            stats = {}
            for key, _ in METRICS:
                xs = [g["metrics"][key] for g in group if key in g["metrics"] and math.isfinite(g["metrics"][key])]
                if xs:
                    stats[key] = mean_std(xs)
            skipped = sorted({g["zeroshot_skipped"] for g in group if g.get("zeroshot_skipped")})
            rows.append({"variant": variant, "n": len(group), "stats": stats, "items": item_scores(group),
                         "zeroshot_skipped": skipped})  # fmt: skip
        out[axis] = rows
    return out


def best_row(rows: list[dict[str, Any]], key: str) -> int | None:
    """Index of the row to bold in column `key`: the best mean, only when the paired bootstrap
    interval of its difference from the next best row excludes 0."""
    ranked = sorted((i for i, r in enumerate(rows) if key in r["stats"]), key=lambda i: -rows[i]["stats"][key][0])
    if len(ranked) < 2:
        return None
    a, b = rows[ranked[0]], rows[ranked[1]]
    if not a["items"] or not b["items"]:
        return None
    ci = paired_bootstrap(a["items"], b["items"], metric_tasks(key, a["items"]))
    return ranked[0] if ci is not None and ci[1] > 0 else None


def _fmt(key: str, stat: tuple[float, float], n: int) -> str:
    digits = 3 if key.endswith("auc") else 1
    return f"{stat[0]:.{digits}f}" + (f" ± {stat[1]:.{digits}f}" if n > 1 else "")


def _cell(key: str, row: dict[str, Any], bold: bool) -> str:
    stat = row["stats"].get(key)
    if stat is None:
        return "null" if key.startswith("zeroshot.") and row.get("zeroshot_skipped") else "–"
    s = _fmt(key, stat, row["n"])
    return f"**{s}**" if bold else s


def _diff_cell(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    return "–" if row is base else _ci_text(compare(row, base, key))


def markdown_table(rows: list[dict[str, Any]], base: dict[str, Any] | None = None, key: str = META) -> str:
    """Mean ± std over seeds per column; `Δ vs base` = the `key` metric's difference from `base`
    with its 95 % bootstrap interval over items; a bold cell is a best that the next best cannot tie."""
    keys = [k for k, _ in METRICS if any(k in r["stats"] for r in rows)]
    if any(k.startswith("zeroshot.") for k in keys) or any(r.get("zeroshot_skipped") for r in rows):
        keys += [k for k, _ in ZS_METRICS[:3] if k not in keys]
        keys = [k for k, _ in METRICS if k in keys]
    bold = {k: best_row(rows, k) for k in keys}
    with_diff = base is not None and key in keys
    head = "| variant | seeds | " + " | ".join(dict(METRICS)[k] for k in keys) + (
        f" | Δ {dict(METRICS)[key]} vs base [95 % CI] |" if with_diff else " |")
    lines = [head, "|---|---:|" + "---:|" * (len(keys) + with_diff)]
    for i, r in enumerate(rows):
        cells = [_cell(k, r, bold[k] == i) for k in keys] + ([_diff_cell(r, base, key)] if with_diff else [])
        lines.append(f"| {r['variant']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the paper's directions


def _row(tabs: dict[str, list[dict[str, Any]]], axis: str, variant: str) -> dict[str, Any] | None:
    return next((r for r in tabs.get(axis, []) if r["variant"] == variant), None)


def compare(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = META) -> tuple[float, float, float] | None:
    """The `key` metric's difference a − b with its paired bootstrap interval (None when a row or
    its items are missing)."""
    if a is None or b is None or not a["items"] or not b["items"]:
        return None
    return paired_bootstrap(a["items"], b["items"], metric_tasks(key, a["items"]))


def _ci_text(ci: tuple[float, float, float] | None) -> str:
    return "–" if ci is None else f"{ci[0]:+.1f} [{ci[1]:+.1f}, {ci[2]:+.1f}]"


def _all(verdicts: list[str]) -> str:
    if not verdicts or "not run" in verdicts:
        return "not run"
    if "reversed" in verdicts:
        return "reversed"
    return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive"


def _pairs(tabs, checks: list[tuple[str, str, str, bool]], key: str) -> tuple[str, str]:
    """Each (axis, a, b, strict): a > b (strict) or a ≥ b; all must hold."""
    verdicts, texts = [], []
    for axis, a, b, strict in checks:
        ci = compare(_row(tabs, axis, a), _row(tabs, axis, b), key)
        verdicts.append(verdict(ci, strict))
        texts.append(f"{a} − {b}: {_ci_text(ci)}")
    return _all(verdicts), "; ".join(texts)


def _monotonic(tabs, key: str) -> tuple[str, str]:
    rows = [r for r in tabs.get("paired_ratio", []) if key in r["stats"] and _num(r["variant"]) is not None]
    if len(rows) < 2:
        return "not run", "–"
    rows.sort(key=lambda r: _num(r["variant"]))
    means = [r["stats"][key][0] for r in rows]
    ci = compare(rows[-1], rows[0], key)
    ends = verdict(ci)
    mono = all(b >= a for a, b in zip(means, means[1:]))
    text = "means " + " → ".join(f"{m:.1f}" for m in means) + f"; r={rows[-1]['variant']} − r={rows[0]['variant']}: {_ci_text(ci)}"
    if ends == "reproduced" and not mono:
        return "partly (endpoints only, not monotonic)", text
    return ends, text


def directions(tabs: dict[str, list[dict[str, Any]]], key: str = META) -> list[tuple[str, str, str]]:
    """(direction, verdict, evidence) for each direction the paper reports, on the `key` metric
    (`headline`: the meta-average where the suite has its tasks)."""
    gran = [("granularities", "R-T+R-P+I-S", g, False) for g in ("R-T", "R-P", "I-S")]
    return [
        ("retrieved pairs > random pairs (Table 3)", *_pairs(tabs, [("recipe", "muvla", "random_pairs", True)], key)),
        ("all three granularities ≥ each alone (Table 2)", *_pairs(tabs, gran, key)),
        ("K = 5 > K = 1 (Fig. 3)", *_pairs(tabs, [("K", "5", "1", True)], key)),
        ("w_ITM helps (Table 4)", *_pairs(tabs, [("w_itm", "with w_ITM", "without w_ITM", True)], key)),
        ("paired ratio monotonic (Table 6, Fig. 1)", *_monotonic(tabs, key)),
        ("μ-VLA > U-VisualBERT > Base (Table 1)", *_pairs(tabs, [("recipe", "muvla", "round_robin", True),
                                                                 ("recipe", "round_robin", "base", True)], key)),  # fmt: skip
    ]


# ---------------------------------------------------------------- plots


def _plot_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    key = headline(rows)
    if any(key in r["stats"] for r in rows):
        return [(key, "fine-tuned meta-average" if key == META else f"fine-tuned {dict(METRICS)[key]}")]
    legacy = [("zeroshot.t2i_r5", "text→image R@5"), ("zeroshot.i2t_r5", "image→text R@5"),
              ("t2i_r5", "text→image R@5"), ("i2t_r5", "image→text R@5")]  # fmt: skip
    return [(k, lab) for k, lab in legacy if any(k in r["stats"] for r in rows)]


def plot_caption(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """Evaluation size, fine-tuning steps and seeds, for the plot title."""
    key = headline(rows)
    n_items = next((sum(len(r["items"][t]) for t in metric_tasks(key, r["items"])) for r in rows if r["items"]), 0)
    steps = next((g["items"]["budget"].get("steps") for g in runs if g.get("items")), None)
    steps = steps or next((g["params"].get("suite/steps") for g in runs if g.get("params", {}).get("suite/steps")), "?")
    seeds = max((r["n"] for r in rows), default=0)
    return f"eval {n_items} items · {steps} fine-tuning steps/task · {seeds} seed{'s' if seeds != 1 else ''}"


def chance_levels(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The fixed chance levels, plus retrieval's R-mean chance as the trials logged it (the same for
    every trial of a sweep: one budget, one set of evaluation images)."""
    key, logged = RETRIEVAL_CHANCE
    xs = [g["metrics"][logged] for g in runs if math.isfinite(g["metrics"].get(logged, math.nan))]
    return {**CHANCE, key: float(np.mean(xs))} if xs else dict(CHANCE)


def _figure(width: float):
    import matplotlib  # lazy: choosing a backend is process-wide; done only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt, *plt.subplots(figsize=(width, 4.4), dpi=120)


def _finish(plt, fig, ax, axis: str, caption: str, ylabel: str, keys: list[str], path: Path,
            chance: dict[str, float] | None = None) -> None:  # fmt: skip
    chance = CHANCE if chance is None else chance
    for key in keys:
        if key in chance:
            ax.axhline(chance[key], color="gray", linestyle="--", linewidth=1.2, label=f"chance ({chance[key]:.1f})")
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(f"{AXIS_TITLES.get(axis, axis)}\n{caption}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_axis(rows: list[dict[str, Any]], axis: str, xlabel: str, path: Path, caption: str = "",
              chance: dict[str, float] | None = None) -> bool:  # fmt: skip
    """Metric vs a numeric axis with ±1 std error bars over seeds. False if the axis is not numeric."""
    pts = [(float(r["variant"]), r) for r in rows if _num(r["variant"]) is not None]
    metrics = _plot_metrics(rows)
    if len(pts) < 2 or not metrics:
        return False
    plt, fig, ax = _figure(6.4)
    for key, label in metrics:
        sel = [(x, r["stats"][key]) for x, r in pts if key in r["stats"]]
        ax.errorbar([x for x, _ in sel], [s[0] for _, s in sel], yerr=[s[1] for _, s in sel],
                    marker="o", capsize=4, linewidth=2, label=label)  # fmt: skip
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_xticks([x for x, _ in pts])
    ax.set_ylim(bottom=0)
    _finish(plt, fig, ax, axis, caption, "score (%)", [k for k, _ in metrics], path, chance)
    return True


def plot_bars(rows: list[dict[str, Any]], axis: str, path: Path, caption: str = "",
              chance: dict[str, float] | None = None) -> bool:  # fmt: skip
    """A categorical axis (granularities, baselines) as bars with ±1 std."""
    metrics = _plot_metrics(rows)
    if len(rows) < 2 or not metrics:
        return False
    plt, fig, ax = _figure(max(6.4, 1.3 * len(rows) + 2))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ms = [r["stats"].get(key, (0.0, 0.0))[0] for r in rows]
        sds = [r["stats"].get(key, (0.0, 0.0))[1] for r in rows]
        ax.bar(xs, ms, width, yerr=sds, capsize=3, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["variant"] for r in rows], rotation=15, ha="right", fontsize=9)
    ax.set_xlabel(axis, fontsize=11)
    _finish(plt, fig, ax, axis, caption, "score (%)", [k for k, _ in metrics], path, chance)
    return True


# ---------------------------------------------------------------- the report


def _examples(client_parent) -> list[dict[str, Any]]:
    client, parent = client_parent
    if parent is None:
        return []
    try:
        with tempfile.TemporaryDirectory() as d:
            p = client.download_artifacts(parent.info.run_id, "retrieval.json", d)
            return json.loads(Path(p).read_text()).get("examples", [])
    except Exception:  # noqa: BLE001 - examples are optional decoration of the report
        return []


XLABELS = {"K": "K (retrieved sentences per image)", "paired_ratio": "paired ratio r (fraction of true pairs)",
           "m": "m (warm-up epochs before w_ITM)"}  # fmt: skip


def _intro(experiment: str, tracking_uri: str, runs: list[dict[str, Any]], key: str = META) -> list[str]:
    ft = any(k in r["metrics"] for r in runs for k, _ in FT_METRICS)
    cols = ("`Meta-Ave` is the paper's meta-average (VQA, NLVR2, VE, RefCOCO+), task columns are percent"
            if key == META else f"`{dict(METRICS)[key]}` is the headline, in percent")  # fmt: skip
    what = ("Each trial was fine-tuned on the downstream suite with one budget and scored on the same evaluation "
            f"items; {cols}. Zero-shot (ZS) columns are `null` for recipes that do not train the ITM head."
            if ft else "Metrics are zero-shot image↔text retrieval on the held-out gold pairs.")  # fmt: skip
    where = tracking.redact(tracking_uri)
    head = "meta-average" if key == META else f"`{dict(METRICS)[key]}` (the trials ran no meta-average task)"
    return [f"# Ablation report: {experiment}", "",
            f"{len(runs)} finished trial runs from `{where}`. {what} Cells are mean ± std over seeds (one seed: "
            f"no ±). `Δ vs base` is the {head} difference from the `base` recipe with a 95 % paired bootstrap "
            f"interval over evaluation items ({BOOTSTRAP} resamples). A cell is bold only when the interval of its "
            "difference from the next best row excludes 0.", ""]  # fmt: skip


def twin_note(runs: list[dict[str, Any]]) -> list[str]:
    """Which rows are another row's trial (`raysys.same_as`): a reader comparing two such rows
    should see that their equality is by construction, not a finding."""
    by_trial = {r["trial"]: r for r in runs if r.get("trial")}
    pairs = sorted({(f"{r['axis']} {r['variant']}", f"{by_trial[r['same_as']]['axis']} {by_trial[r['same_as']]['variant']}")
                    for r in runs if r.get("same_as") in by_trial})  # fmt: skip
    if not pairs:
        return []
    return ["Rows that are one configuration are trained once per seed and show that trial: "
            + "; ".join(f"`{a}` is `{b}`" for a, b in pairs) + ".", ""]  # fmt: skip


def write_report(tracking_uri: str, experiment: str, out: str | os.PathLike) -> dict[str, Any]:
    out = Path(out)
    runs, cp = load_runs(tracking_uri, experiment)
    if not runs:
        raise ConfigError(f"{tracking.redact(tracking_uri)}: experiment {experiment!r} has no finished trial runs "
                          "tagged raysys.axis (is it a `raysys sweep` experiment?)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused report leaves no directory
    tabs = tables(runs)
    base = _row(tabs, "recipe", "base")
    key = headline([r for rows in tabs.values() for r in rows])
    md = _intro(experiment, tracking_uri, runs, key) + twin_note(runs)
    plots = []
    for axis, rows in tabs.items():
        md += [f"## {AXIS_TITLES.get(axis, axis)}", "", markdown_table(rows, base, key), ""]
        png = out / f"{axis}.png"
        group = [g for g in runs if g["axis"] == axis]
        caption, chance = plot_caption(rows, group), chance_levels(group)
        if (plot_axis(rows, axis, XLABELS.get(axis, axis), png, caption, chance)
                or plot_bars(rows, axis, png, caption, chance)):  # fmt: skip
            plots.append(png.name)
            md += [f"![{axis}]({png.name})", ""]
    dirs = directions(tabs, key)
    what = "meta-average" if key == META else dict(METRICS)[key]
    md += ["## Directions of the paper: does this run reproduce them?", "",
           f"| direction | verdict | evidence ({what} difference [95 % CI]) |", "|---|---|---|"]  # fmt: skip
    md += [f"| {d} | {v} | {e} |" for d, v, e in dirs] + [""]
    examples = _examples(cp)
    if examples:
        md += ["## Retrieval examples", ""]
        for ex in examples[:5]:
            md.append(f"- **{ex.get('image_id')}** — tags: {', '.join(ex.get('tags', []))}")
            for s in ex.get("retrieved", [])[:3]:
                md.append(f"  - {s.get('text') if isinstance(s, dict) else s}")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    return {"report": str(out / "report.md"), "plots": plots, "axes": list(tabs), "runs": len(runs),
            "directions": {d: v for d, v, _ in dirs}}  # fmt: skip
