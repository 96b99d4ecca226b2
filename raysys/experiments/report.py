"""`raysys report`: read a sweep's MLflow experiment and write a paper-style `report.md` + PNG plots.

The report is rebuilt from MLflow alone (not from Tune's files), so it works for any sweep whose
trial runs carry the tags the sweep sets:

- `raysys.axis`: the ablation axis the trial belongs to (`K`, `m`, `granularities`, `w_itm`,
  `recipe`, `paired_ratio`, or `grid` for a full grid),
- `raysys.variant`: the value on that axis, as text,
- `raysys.seed`: the trial's seed (tables average over it: mean ± std).

One table per axis, in the shape of the paper's Tables 2 (granularities), 3/5 (baselines), 4
(w_ITM) and 6 (paired ratio); plots of the metric against K (paper Fig. 3) and against the paired
ratio (paper Fig. 1); and retrieval examples from the sweep's parent run artifact.
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

AXIS_TITLES = {
    "K": "Retrieved sentences per image K (paper Fig. 3)",
    "m": "Curriculum warm-up epochs m (paper §3.4)",
    "granularities": "Pre-training granularities (paper Table 2)",
    "w_itm": "Weighted ITM (paper Table 4)",
    "recipe": "Baselines (paper Tables 1, 3, 5)",
    "paired_ratio": "Paired ratio r of true pairs (paper Table 6, Fig. 1)",
    "grid": "Full grid",
}
METRICS = [("t2i_r1", "T→I R@1"), ("t2i_r5", "T→I R@5"), ("t2i_r10", "T→I R@10"),
           ("i2t_r1", "I→T R@1"), ("i2t_r5", "I→T R@5"), ("i2t_r10", "I→T R@10"), ("itm_auc", "ITM AUC")]  # fmt: skip
PLOT_METRICS = [("t2i_r5", "text→image R@5"), ("i2t_r5", "image→text R@5")]


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


def load_runs(tracking_uri: str, experiment: str) -> tuple[list[dict[str, Any]], Any]:
    """Finished trial runs of the experiment as plain dicts, and the sweep's parent run (or None)."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"{tracking_uri}: no MLflow experiment named {experiment!r}")
    runs, parent = [], None
    for r in client.search_runs([exp.experiment_id], max_results=50_000):
        tags = r.data.tags
        if tags.get("raysys.role") == "sweep":
            parent = r
            continue
        if "raysys.axis" not in tags or r.info.status != "FINISHED":
            continue
        runs.append({"axis": tags["raysys.axis"], "variant": tags.get("raysys.variant", ""),
                     "seed": tags.get("raysys.seed", ""), "metrics": dict(r.data.metrics), "run_id": r.info.run_id})  # fmt: skip
    return runs, (client, parent)


def tables(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """axis -> rows (variant, n seeds, {metric: (mean, std)}), variants in natural order."""
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
                xs = [g["metrics"][key] for g in group if key in g["metrics"]]
                if xs:
                    stats[key] = mean_std(xs)
            rows.append({"variant": variant, "n": len(group), "stats": stats})
        out[axis] = rows
    return out


def _cell(key: str, stat: tuple[float, float] | None, best: bool) -> str:
    if stat is None:
        return "–"
    s = f"{stat[0]:.3f} ± {stat[1]:.3f}" if key == "itm_auc" else f"{stat[0]:.1f} ± {stat[1]:.1f}"
    return f"**{s}**" if best else s


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k, _ in METRICS if any(k in r["stats"] for r in rows)]
    best = {k: max((r["stats"][k][0] for r in rows if k in r["stats"]), default=None) for k in keys}
    head = "| variant | seeds | " + " | ".join(dict(METRICS)[k] for k in keys) + " |"
    sep = "|---|---:|" + "---:|" * len(keys)
    lines = [head, sep]
    for r in rows:
        cells = [_cell(k, r["stats"].get(k), len(rows) > 1 and r["stats"].get(k, (None,))[0] == best[k]) for k in keys]
        lines.append(f"| {r['variant']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_axis(rows: list[dict[str, Any]], axis: str, xlabel: str, path: Path) -> bool:
    """Metric vs a numeric axis with ±1 std error bars over seeds. False if the axis is not numeric."""
    pts = [(float(r["variant"]), r) for r in rows if _num(r["variant"]) is not None]
    if len(pts) < 2:
        return False
    import matplotlib  # lazy: choosing a backend is process-wide; done only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label in PLOT_METRICS:
        xs = [x for x, r in pts if key in r["stats"]]
        if not xs:
            continue
        ms = [r["stats"][key][0] for _, r in pts if key in r["stats"]]
        sds = [r["stats"][key][1] for _, r in pts if key in r["stats"]]
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=4, linewidth=2, label=label)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel("zero-shot recall@5 (%)", fontsize=11)
    ax.set_title(AXIS_TITLES.get(axis, axis), fontsize=11)
    ax.set_xticks([x for x, _ in pts])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_bars(rows: list[dict[str, Any]], axis: str, path: Path) -> None:
    """A categorical axis (granularities, baselines) as grouped bars with ±1 std."""
    import matplotlib  # lazy: choosing a backend is process-wide; done only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(rows) + 2), 4.2), dpi=120)
    width = 0.38
    for j, (key, label) in enumerate(PLOT_METRICS):
        xs = [i + (j - 0.5) * width for i in range(len(rows))]
        ms = [r["stats"].get(key, (0.0, 0.0))[0] for r in rows]
        sds = [r["stats"].get(key, (0.0, 0.0))[1] for r in rows]
        ax.bar(xs, ms, width, yerr=sds, capsize=3, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["variant"] for r in rows], rotation=15, ha="right", fontsize=9)
    ax.set_ylabel("zero-shot recall@5 (%)", fontsize=11)
    ax.set_xlabel(axis, fontsize=11)
    ax.set_title(AXIS_TITLES.get(axis, axis), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def write_report(tracking_uri: str, experiment: str, out: str | os.PathLike) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, cp = load_runs(tracking_uri, experiment)
    if not runs:
        raise ValueError(f"{tracking_uri}: experiment {experiment!r} has no finished trial runs tagged raysys.axis")
    tabs = tables(runs)
    md = [f"# Ablation report: {experiment}", "",
          f"{len(runs)} finished trial runs from `{tracking_uri}`. Metrics are zero-shot image↔text retrieval "
          "on the held-out gold pairs (recall in %, ITM ROC-AUC in [0, 1]); each cell is mean ± std over seeds; "
          "the best mean per column is bold.", ""]  # fmt: skip
    plots = []
    for axis, rows in tabs.items():
        md += [f"## {AXIS_TITLES.get(axis, axis)}", "", markdown_table(rows), ""]
        png = out / f"{axis}.png"
        xlabel = {"K": "K (retrieved sentences per image)", "paired_ratio": "paired ratio r (fraction of true pairs)",
                  "m": "m (warm-up epochs before w_ITM)"}.get(axis, axis)  # fmt: skip
        if plot_axis(rows, axis, xlabel, png) or (len(rows) > 1 and plot_bars(rows, axis, png) is None):
            plots.append(png.name)
            md += [f"![{axis}]({png.name})", ""]
    examples = _examples(cp)
    if examples:
        md += ["## Retrieval examples", ""]
        for ex in examples[:5]:
            md.append(f"- **{ex.get('image_id')}** — tags: {', '.join(ex.get('tags', []))}")
            for s in ex.get("retrieved", [])[:3]:
                text = s.get("text") if isinstance(s, dict) else s
                md.append(f"  - {text}")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    return {"report": str(out / "report.md"), "plots": plots, "axes": list(tabs), "runs": len(runs)}
