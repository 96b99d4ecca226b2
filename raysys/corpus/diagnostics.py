"""How good is the weakly aligned corpus? Reports written next to the data (JSON + Markdown) and to MLflow.

* **Tag coverage**: the mean, over images, of the fraction of an image's distinct tags that occur
  (as a word, singular or plural) in its top-K retrieved sentences — and the same for K random
  sentences per image. Retrieval is useful exactly when the first is well above the second.
* **Gold recall@1/5/10/K** (whenever `gold/` holds true pairs for these images): the share of gold
  images (tagged or not: an image without a query counts as a miss, so tag sources of different
  coverage compare fairly) with at least one true caption among their top-c, next to the chance
  level of K random sentences. Cutoffs above the stored K come from an exact search of the stored
  embeddings (`gold_recall_exact_cutoffs` names them), so recall@10 is there at any K.
* **Query settings**: the tag source and query form recorded with the image embeddings decide which
  tags the coverage and the examples use.
* **Examples**: a few images with their tags, query and retrieved sentences.

Coverage is measured on a seeded sample of at most `max_images` images: it is a regex per
(tag, sentence) in Python, and a sample of 10,000 images pins a mean fraction to ±0.01.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysys.contract import read_table, shard_files, write_text_atomic
from raysys.corpus.embedding import (
    LEGACY_QUERY,
    META,
    SOURCE_COLUMNS,
    QueryMode,
    distinct_tags,
    image_query,
    mean_query_tags,
    read_embeddings,
)

log = logging.getLogger(__name__)

# Irregular plurals of common detector classes (COCO, Visual Genome): "person" is "people" in captions.
IRREGULAR = {
    "person": ["people", "persons"], "man": ["men"], "woman": ["women"], "child": ["children"],
    "mouse": ["mice"], "knife": ["knives"], "leaf": ["leaves"], "shelf": ["shelves"], "foot": ["feet"],
    "tooth": ["teeth"], "wolf": ["wolves"], "loaf": ["loaves"], "goose": ["geese"],
}  # fmt: skip


@lru_cache(maxsize=65536)
def tag_pattern(tag: str) -> re.Pattern:
    """Whole-word, case-insensitive match of a tag or its plural (last word inflected)."""
    words = tag.lower().split()
    head, last = words[:-1], words[-1]
    forms = {last, last + "s", last + "es", *IRREGULAR.get(last, [])}
    if last.endswith("y") and len(last) > 1:
        forms.add(last[:-1] + "ies")
    if last.endswith("s"):
        forms.add(last[:-1])  # VG "plants", COCO "skis": the singular counts too
    prefix = r"\s+".join(re.escape(w) for w in head)
    body = "(?:" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + ")"
    return re.compile(r"\b" + (prefix + r"\s+" if prefix else "") + body + r"\b", re.IGNORECASE)


def tag_coverage(tags: Sequence[str], sentences: Sequence[str]) -> float:
    """Fraction of the distinct tags that occur in any of the sentences."""
    distinct = distinct_tags(tags)
    if not distinct:
        return 0.0
    text = "\n".join(sentences)
    return sum(1 for t in distinct if tag_pattern(t).search(text)) / len(distinct)


def chance_recall(n_texts: int, n_gold: int, k: int) -> float:
    """P(at least one of n_gold true texts among k drawn without replacement from n_texts)."""
    if n_gold <= 0:
        return 0.0
    if k >= n_texts - n_gold + 1:
        return 1.0
    return 1.0 - math.exp(sum(math.log((n_texts - n_gold - j) / (n_texts - j)) for j in range(k)))


def _ranked_pairs(data: Path, texts: pa.Table) -> tuple[Any, Any, Any, int]:
    """(all pairs as a DataFrame, image_id -> text rows by rank, image_id -> scores by rank, K stored)."""
    import pandas as pd  # lazy: 1.1 s that importers of retrieval (and its configs) need not pay

    pairs = read_table(data, "pairs", ["image_id", "text_id", "rank", "score"]).to_pandas()
    k_stored = int(pairs["rank"].max()) + 1 if len(pairs) else 0
    text_index = pd.Index(texts.column("text_id").to_pandas())
    pairs["pos"] = text_index.get_indexer(pairs["text_id"])
    pairs = pairs.sort_values(["image_id", "rank"], kind="stable")
    ranked = pairs.groupby("image_id", sort=True)["pos"].apply(np.asarray)  # image_id -> text rows by rank
    scores = pairs.groupby("image_id", sort=True)["score"].apply(np.asarray)
    return pairs, ranked, scores, k_stored


GOLD_CUTOFFS = (1, 5, 10)


def recall_at(retrieved: dict[str, Sequence[str]], gold_of: dict[str, set[str]], cutoffs: Sequence[int]) -> dict[str, float]:
    """Gold recall@c for every cutoff: over the images of `gold_of`, the share with a gold text id
    among the first c of their ranked `retrieved` text ids (an image absent from it is a miss)."""
    images = list(gold_of)
    return {
        str(c): (float(np.mean([any(t in gold_of[i] for t in list(retrieved.get(i, ()))[:c]) for i in images]))
                 if images else 0.0)
        for c in cutoffs
    }  # fmt: skip


def exact_topk(data: Path, image_ids: Sequence[str], c: int, chunk: int = 1024) -> dict[str, list[str]]:
    """image_id -> text ids of its exact top-c by inner product over the stored embeddings (score
    descending, then text row ascending, as the retrieval merge orders them); images without an
    embedding (no query) are absent."""
    q_ids, q = read_embeddings(data, "images")
    t_ids, t = read_embeddings(data, "texts")
    want = set(image_ids)
    rows = [i for i, iid in enumerate(q_ids.to_pylist()) if iid in want]
    out: dict[str, list[str]] = {}
    if not rows or not len(t):
        return out
    c = min(c, len(t))
    tid = t_ids.to_pylist()
    qid = q_ids.to_pylist()
    for lo in range(0, len(rows), chunk):
        sel = rows[lo : lo + chunk]
        S = q[sel] @ t.T
        part = np.argpartition(-S, c - 1, axis=1)[:, :c]
        for r, cand in zip(range(len(sel)), part):
            order = cand[np.lexsort((cand, -S[r, cand]))]
            out[qid[sel[r]]] = [tid[j] for j in order]
    return out


def _gold_recall(
    data: Path, k: int, k_stored: int, img_ids: list[str], ranked: Any, texts: pa.Table
) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Gold recall@{1,5,10,K} overall and by split, next to chance; and image_id -> its gold text ids."""
    gold = read_table(data, "gold", ["image_id", "text_id", "split"])
    gold_of: dict[str, set[str]] = {}
    split_of: dict[str, str] = {}
    for iid, tid, sp in zip(*(gold.column(c).to_pylist() for c in ("image_id", "text_id", "split"))):
        gold_of.setdefault(iid, set()).add(tid)
        split_of.setdefault(iid, sp or "")
    have = [iid for iid in img_ids if iid in gold_of]
    report: dict[str, Any] = {"gold_images": len(have)}
    if not have:
        return report, gold_of
    n_texts = texts.num_rows
    tids = texts.column("text_id")
    gold_here = {iid: gold_of[iid] for iid in have}
    stored = {iid: tids.take(pa.array(ranked[iid], pa.int64())).to_pylist() for iid in have if iid in ranked.index}
    cutoffs = sorted(set(GOLD_CUTOFFS) | {k})
    exact = [c for c in cutoffs if c > max(k_stored, 1)]
    hits = recall_at(stored, gold_here, [c for c in cutoffs if c not in exact])
    if exact:  # beyond the stored K: an exact search of the stored embeddings
        hits.update(recall_at(exact_topk(data, have, max(exact)), gold_here, exact))
    by_split: dict[str, dict[str, set[str]]] = {}
    for iid in have:
        by_split.setdefault(split_of[iid], {})[iid] = gold_of[iid]
    chance = [chance_recall(n_texts, len(gold_of[iid]), k) for iid in have]
    report["gold_recall_at_k"] = round(hits[str(k)], 4)
    report["gold_recall_at"] = {str(c): round(hits[str(c)], 4) for c in cutoffs}
    report["gold_recall_by_split"] = {s: round(recall_at(stored, g, [k])[str(k)], 4) for s, g in sorted(by_split.items())}
    report["gold_recall_random"] = round(float(np.mean(chance)), 4)
    if exact:
        report["gold_recall_exact_cutoffs"] = exact
    return report, gold_of


def query_settings(data: Path, query: QueryMode = "regions") -> dict[str, str]:
    """The query settings the image embeddings were made with (their `_meta.json`); `query` and the
    defaults where it does not say."""
    meta_path = data / "embeddings" / "images" / META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {"query": meta.get("query", query), **{k: meta.get(k, v) for k, v in LEGACY_QUERY.items()}}


def readable_query(text: str) -> str:
    """A query as the examples show it: a `tag_mean` query as "mean(tag | tag | ...)"."""
    tags = mean_query_tags(text)
    return text if tags is None else "mean(" + " | ".join(tags) + ")"


def retrieval_diagnostics(
    data: str | Path, k: int, seed: int = 0, examples: int = 5, max_images: int = 10_000, query: QueryMode = "regions"
) -> dict[str, Any]:
    """Tag coverage (retrieved vs random), gold recall@K where gold exists, and examples."""
    data = Path(data)
    qs = query_settings(data, query)
    pairs_of_cols = SOURCE_COLUMNS[qs["tag_source"]]
    images = read_table(data, "images", ["image_id", *(c for pair in pairs_of_cols for c in pair)])
    texts = read_table(data, "texts", ["text_id", "text"])
    pairs, ranked, scores, k_stored = _ranked_pairs(data, texts)
    n_texts = texts.num_rows
    text_col = texts.column("text")

    def sentences(rows: np.ndarray) -> list[str]:
        return text_col.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []

    img_ids = images.column("image_id").to_pylist()
    per_source = [(images.column(t).to_pylist(), images.column(s).to_pylist()) for t, s in pairs_of_cols]
    sources_of = [[(t[i] or [], s[i] or []) for t, s in per_source] for i in range(len(img_ids))]
    tags_col = [[x for t, _ in src for x in t] for src in sources_of]  # every tag of the query's sources
    scores_col = [[x for _, s in src for x in s] for src in sources_of]
    with_pairs = [i for i, iid in enumerate(img_ids) if iid in ranked.index]
    # one generator, drawn in this order: the coverage sample, its random sentences, the examples
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1A6]))
    sample = with_pairs if len(with_pairs) <= max_images else sorted(rng.choice(with_pairs, max_images, replace=False).tolist())

    cov_ret, cov_rnd = [], []
    for i in sample:
        rows = ranked[img_ids[i]][:k]
        cov_ret.append(tag_coverage(tags_col[i], sentences(rows)))
        rnd = rng.choice(n_texts, size=min(len(rows), n_texts), replace=False)
        cov_rnd.append(tag_coverage(tags_col[i], sentences(rnd)))
    report: dict[str, Any] = {
        "k": k,
        "images": len(img_ids),
        "images_with_pairs": len(with_pairs),
        "texts": n_texts,
        **qs,
        "coverage_images": len(sample),
        "tag_coverage_retrieved": round(float(np.mean(cov_ret)), 4) if cov_ret else 0.0,
        "tag_coverage_random": round(float(np.mean(cov_rnd)), 4) if cov_rnd else 0.0,
        "mean_score_at_1": round(float(pairs.loc[pairs["rank"] == 0, "score"].mean()), 4) if len(pairs) else None,
    }
    gold_of: dict[str, set[str]] = {}
    if shard_files(data, "gold"):
        gold_report, gold_of = _gold_recall(data, k, k_stored, img_ids, ranked, texts)
        report.update(gold_report)

    ex_rows = with_pairs if len(with_pairs) <= examples else sorted(rng.choice(with_pairs, examples, replace=False).tolist())
    tids = texts.column("text_id")
    report["examples"] = [
        {
            "image_id": img_ids[i],
            "tags": distinct_tags(tags_col[i], scores_col[i]),
            "query": readable_query(image_query(sources_of[i], qs["query"], qs["query_mode"])),
            "retrieved": [
                {"rank": r, "score": round(float(s), 4), "text_id": t, "text": x,
                 **({"gold": t in gold_of.get(img_ids[i], set())} if gold_of else {})}  # fmt: skip
                for r, (t, x, s) in enumerate(
                    zip(
                        tids.take(pa.array(ranked[img_ids[i]][:k], pa.int64())).to_pylist(),
                        sentences(ranked[img_ids[i]][:k]),
                        scores[img_ids[i]][:k],
                    )
                )
            ],
        }
        for i in ex_rows
    ]
    return report


def markdown(name: str, report: dict[str, Any]) -> str:
    lines = [f"# {name} diagnostics", "", "| metric | value |", "|---|---|"]
    for key, v in report.items():
        if key != "examples":
            lines.append(f"| {key} | {json.dumps(v, default=_jsonable) if isinstance(v, (dict, list)) else v} |")
    for ex in report.get("examples", []):
        if "retrieved" not in ex:
            lines += ["", "- " + json.dumps(ex, default=_jsonable)]
            continue
        lines += ["", f"## {ex['image_id']}", "", f"tags: {', '.join(ex['tags'])}", ""]
        for r in ex["retrieved"]:
            mark = " (gold)" if r.get("gold") else ""
            lines.append(f"{r['rank'] + 1}. [{r['score']:.3f}] {r['text']}{mark}")
    return "\n".join(lines) + "\n"


def _numeric(report: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, v in report.items():
        if isinstance(v, bool) or key == "examples":
            continue
        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            out[f"{prefix}.{key}"] = float(v)
        elif isinstance(v, dict):
            out.update(_numeric({f"{key}.{kk}": vv for kk, vv in v.items()}, prefix))
    return out


def log_to_mlflow(name: str, report: dict[str, Any], files: Sequence[Path]) -> bool:
    """Log metrics and the report files to the active MLflow run, if there is one.

    MLflow is not imported for this: if nothing imported it, no run can be active.
    """
    if "mlflow" not in sys.modules:
        return False
    import mlflow  # lazy: only when a caller already imported it (then it costs nothing)

    if mlflow.active_run() is None:
        return False
    mlflow.log_metrics(_numeric(report, name))
    for f in files:
        mlflow.log_artifact(str(f), artifact_path="diagnostics")
    return True


def write_report(data: str | Path, name: str, report: dict[str, Any]) -> list[Path]:
    """`DIR/diagnostics/<name>.json` + `.md`, and the active MLflow run."""
    d = Path(data) / "diagnostics"
    files = [d / f"{name}.json", d / f"{name}.md"]
    write_text_atomic(files[0], json.dumps(report, indent=2, default=_jsonable))
    write_text_atomic(files[1], markdown(name, report))
    if log_to_mlflow(name, report, files):
        log.info("logged %s diagnostics to MLflow", name)
    return files


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, pa.Scalar):
        return v.as_py()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")

