"""Zero-shot retrieval on Flickr8k dev: a short μ-VLA pre-training vs `base` (R@1/5/10 both ways).

End to end on real photos, the way a user would run it:

1. `featurize` the Flickr8k train photos into WORK/train and the 1,000 dev photos into WORK/eval
   (cached: re-runs skip finished shards);
2. the train captions, shuffled (their pairing thrown away), are WORK/train's text corpus: the
   unpaired setting. WORK/eval gets the 5,000 dev captions and their gold pairs;
3. `retrieve` + `phrases` on WORK/train, then a short local pre-training (`--steps`);
4. zero-shot on the dev split for the pre-trained model and for `base` (same layers, fresh heads).

The baseline of the same run is `base`; the JSON reports both and the ratio of their mean recall.
Scoring all 1,000 × 5,000 pairs with a single-stream model is 5 M forward passes, far beyond a CPU,
so by default a coarse stage (tag-query ↔ caption sentence embeddings) keeps the top
`--coarse-top-n` candidates per query, and the JSON says so (`coarse_used`, `coarse_*_recall`);
`--full` scores every pair (meant for a GPU cluster: Ray actors with `--gpus-per-worker 1`).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path
from typing import Any


def _default_flickr() -> Path:
    root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("RAYSYS_SHARED", root.parent / "shared")) / "data" / "flickr8k"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flickr", default=str(_default_flickr()), help="Flickr8k folder (images/, captions.tsv, split.tsv)")
    p.add_argument("--work", default="bench_flickr8k", help="working directory (featurized data is cached here)")
    p.add_argument("--train-images", type=int, default=4000, help="train photos to pre-train on (default: all 4,000)")
    p.add_argument("--eval-images", type=int, default=1000, help="dev photos to evaluate on (default: all 1,000)")
    p.add_argument("--steps", type=int, default=300, help="pre-training steps (default 300)")
    p.add_argument("--layers", type=int, default=2, help="encoder layers of both models (default 2; 0 = all 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--recipe", default="muvla")
    p.add_argument("--coarse-top-n", type=int, default=10, help="candidates per query kept by the coarse stage")
    p.add_argument("--full", action="store_true", help="no coarse stage: score every (image, caption) pair")
    p.add_argument("--workers", type=int, default=0, help="Ray actors for pair scoring (default: one per CPU)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def _splits(flickr: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(flickr / "split.tsv", encoding="utf-8", newline="") as f:
        for row in list(csv.reader(f, delimiter="\t"))[1:]:
            out.setdefault(row[1], []).append(row[0])
    return {k: sorted(v) for k, v in out.items()}


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict[str, float]]:
    """WORK/train (train photos + shuffled train captions) and WORK/eval (dev photos + dev gold)."""
    import numpy as np  # lazy: keeps raysys --help fast

    from raysys.contract import shard_files  # lazy: keeps raysys --help fast
    from raysys.data.featurize import FeaturizeConfig, featurize  # lazy: keeps raysys --help fast
    from raysys.data.importers import import_texts  # lazy: keeps raysys --help fast

    flickr, work = Path(args.flickr), Path(args.work)
    splits = _splits(flickr)
    train_ids, dev_ids = splits["train"][: args.train_images], splits["dev"][: args.eval_images]
    times: dict[str, float] = {}
    for name, ids in (("train", train_ids), ("eval", dev_ids)):
        t = time.perf_counter()
        featurize(FeaturizeConfig(), [flickr / "images" / i for i in ids], work / name)
        times[f"featurize_{name}_s"] = round(time.perf_counter() - t, 1)
    keep_train, keep_dev = set(train_ids), set(dev_ids)
    caps: dict[str, list[str]] = {"train": [], "dev": []}
    with open(flickr / "captions.tsv", encoding="utf-8", newline="") as f:
        for row in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]:
            if row[0] in keep_train:
                caps["train"].append(row[2])
            elif row[0] in keep_dev:
                caps["dev"].append("\t".join(row))
    if not shard_files(work / "train", "texts"):
        rng = np.random.default_rng(args.seed)
        lines = [caps["train"][i] for i in rng.permutation(len(caps["train"]))]  # the pairing is thrown away
        src = work / "train_captions_shuffled.txt"
        src.write_text("\n".join(lines) + "\n", encoding="utf-8")
        import_texts([src], "lines", work / "train", source="flickr8k_train_shuffled")
    if not shard_files(work / "eval", "gold"):
        src = work / "dev_captions" / "captions.tsv"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("image\tcaption_index\tcaption\n" + "\n".join(caps["dev"]) + "\n", encoding="utf-8")
        (src.parent / "split.tsv").write_text("image\tsplit\n" + "".join(f"{i}\tdev\n" for i in dev_ids))
        import_texts([src], "flickr8k", work / "eval", source="flickr8k_dev")
    return work / "train", work / "eval", times


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray  # lazy: keeps raysys --help fast

    from raysys.corpus.phrases import extract_phrases  # lazy: keeps raysys --help fast
    from raysys.corpus.retrieval import retrieve  # lazy: keeps raysys --help fast
    from raysys.evaluate import zeroshot  # lazy: keeps raysys --help fast
    from raysys.pretrain.config import PretrainConfig  # lazy: keeps raysys --help fast
    from raysys.pretrain.loop import train_local  # lazy: keeps raysys --help fast
    from raysys.raycluster import ensure_ray  # lazy: keeps raysys --help fast
    from raysys.rss import PeakRSS  # lazy: keeps raysys --help fast

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        train, evald, times = prepare(args)
        started = ensure_ray()
        try:
            t = time.perf_counter()
            retrieval = retrieve(train)
            phrases = extract_phrases(train)
            times["retrieve_phrases_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            pcfg = PretrainConfig(recipe=args.recipe, model_layers=args.layers, batch_size=args.batch_size,
                                  lr=args.lr, steps=args.steps, seed=args.seed, log_every=25)  # fmt: skip
            pre = train_local(pcfg, train, out=Path(args.work) / f"model_{args.recipe}_{args.steps}_{args.layers}")
            times["pretrain_s"] = round(time.perf_counter() - t, 1)
            zc = zeroshot.ZeroShotConfig(split="dev", coarse="none" if args.full else "tags", coarse_top_n=args.coarse_top_n,
                                base_layers=args.layers, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                                seed=args.seed, mlflow=False)  # fmt: skip
            rows = {}
            for name, ck in (("pretrained", pre["checkpoint"]), ("base", "base")):
                t = time.perf_counter()
                rows[name] = zeroshot.evaluate_zeroshot(ck, evald, zc)
                times[f"zeroshot_{name}_s"] = round(time.perf_counter() - t, 1)
        finally:
            if started:
                ray.shutdown()
    print(zeroshot.format_table(rows))
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itm_auc", "r_mean", "i2t_median_rank",
            "t2i_median_rank", "coarse_i2t_recall", "coarse_t2i_recall", "pairs_per_s", "n_pairs_scored")  # fmt: skip
    p, b = rows["pretrained"], rows["base"]
    return {
        "bench": "zeroshot-flickr8k",
        "n_images": p["n_images"], "n_texts": p["n_texts"], "coarse_used": p["coarse_used"],
        "coarse_top_n": p["coarse_top_n"], "train_images": args.train_images, "steps": args.steps,
        "layers": args.layers, "recipe": args.recipe,
        "pretrained": {k: p.get(k) for k in keys}, "base": {k: b.get(k) for k in keys},
        **{k: p[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itm_auc")},
        "ratio_r_mean_vs_base": round(p["r_mean"] / b["r_mean"], 3) if b["r_mean"] else None,
        "pretrain_final_loss": pre.get("final_loss"), "pretrain_itm": pre.get("is.itm"),
        "retrieval_gold_recall_at_k": retrieval.get("gold_recall_at_k"), "phrases": phrases.get("phrases"),
        **times, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(mem.peak_mb, 1),
    }  # fmt: skip
