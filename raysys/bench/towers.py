"""Two-tower zero-shot retrieval (`coarse=towers`) at Flickr8k-dev scale vs single-stream ITM scoring.

Flickr8k dev is 1,000 images × 5,000 captions: 5 M (image, text) pairs. The single-stream model
scores each pair with one cross-modal forward pass; the two-stage encoder's uni-modal towers embed
each image and each text once and rank by cosine. This bench builds an evaluation set of that
shape (`--images` images with 36 regions of 2048-d features and detector tags, `--captions`
captions each: the cost does not depend on the content, so the set is generated), runs
`raysys evaluate zeroshot coarse=towers` on it for `base` (two-stage, half the backbone's layers
uni-modal), and in the same run times single-stream ITM scoring of every pair of a
`--single-images` sample (the baseline). It reports both rates in pairs per second, their ratio,
and the towers' wall time for the whole set (target: under 2 minutes on this machine's CPUs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ["dog", "man", "woman", "child", "ball", "grass", "street", "water", "red", "blue", "runs", "jumps", "sits",
         "on", "in", "near", "the", "a", "small", "large", "white", "black", "shirt", "beach", "bike", "rides"]  # fmt: skip
TAGS = ["dog", "person", "ball", "car", "bicycle", "tree", "shirt", "water", "grass", "bench"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5, help="captions per image (default 5: 5,000 texts)")
    p.add_argument("--single-images", type=int, default=50, help="images of the single-stream sample (all their captions)")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--work", default="", help="where the generated set goes (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)


def make_eval_set(root: Path, n_images: int, captions: int, regions: int, dim: int, seed: int) -> Path:
    """A dataset in the contract layout: images (random features, boxes, tags), texts and their
    gold `eval` pairs."""
    import numpy as np  # lazy: keeps raysys --help fast
    import pyarrow as pa  # lazy: keeps raysys --help fast

    from raysys.contract import (  # lazy: keeps raysys --help fast
        GOLD_SCHEMA,
        TEXTS_SCHEMA,
        ImageRecord,
        images_table,
        shard_name,
        update_manifest,
        write_parquet_atomic,
    )

    rng = np.random.default_rng(seed)
    recs, tids, texts, gold = [], [], [], []
    for i in range(n_images):
        x1y1 = rng.uniform(0, 300, (regions, 2))
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(20, 200, (regions, 2))], 1).astype(np.float32)
        cls = rng.integers(0, len(TAGS), regions)
        recs.append(ImageRecord(f"img{i:05d}", 500, 500, boxes, rng.normal(0, 1, (regions, dim)).astype(np.float32),
                                [TAGS[c] for c in cls], np.full(regions, 0.9, np.float32), cls.astype(np.int32), "bench"))  # fmt: skip
        for j in range(captions):
            tids.append(f"t{i:05d}_{j}")
            texts.append(" ".join(WORDS[w] for w in rng.integers(0, len(WORDS), int(rng.integers(8, 16)))))
            gold.append(f"img{i:05d}")
    write_parquet_atomic(images_table(recs, dim), root / "images" / shard_name(0))
    write_parquet_atomic(pa.table({"text_id": tids, "text": texts, "source": ["bench"] * len(tids)}, schema=TEXTS_SCHEMA),
                         root / "texts" / shard_name(0))  # fmt: skip
    write_parquet_atomic(pa.table({"image_id": gold, "text_id": tids, "split": ["eval"] * len(tids)}, schema=GOLD_SCHEMA),
                         root / "gold" / shard_name(0))  # fmt: skip
    update_manifest(root, "bench-towers", feature_dim=dim, tag_vocab=TAGS)
    return root


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raysys.evaluate.zeroshot import ZeroShotConfig, evaluate_zeroshot  # lazy: keeps raysys --help fast

    with tempfile.TemporaryDirectory(prefix="raysys-bench-towers-") as tmp:
        root = Path(args.work or tmp) / "eval"
        t = time.perf_counter()
        make_eval_set(root, args.images, args.captions, args.regions, args.dim, args.seed)
        gen_s = time.perf_counter() - t
        cfg = ZeroShotConfig(coarse="towers", batch_size=args.batch_size, single_stream_sample=args.single_images,
                             mlflow=False, seed=args.seed)  # fmt: skip
        res = evaluate_zeroshot("base", root, cfg, log_to_mlflow=False)
    return {
        "bench": "towers",
        "n_images": res["n_images"], "n_texts": res["n_texts"], "pairs": res["n_pairs_full"],
        "towers_seconds": res["towers_seconds"], "towers_pairs_per_s": res["towers_pairs_per_s"],
        "single_stream_sample": res["single_stream_sample"],
        "single_stream_pairs_per_s": res["single_stream_pairs_per_s"],
        "speedup": res.get("towers_speedup"),
        "single_stream_full_set_hours": round(res["n_pairs_full"] / res["single_stream_pairs_per_s"] / 3600, 2),
        "under_2_min": res["towers_seconds"] < 120, "uni_layers": res["uni_layers"], "device": res["device"],
        "generate_s": round(gen_s, 1), "seconds": res["seconds"],
    }  # fmt: skip
