"""Featurize: Ray Data pipeline vs a single-process loop (images/s, ratio, peak RSS) + tag quality.

The two run on the same images in the same run; peak memory covers the whole process tree (Ray
workers included); detector tags are checked against Flickr8k train captions.

Both sides run `raysys.data.featurize.featurize` end to end (read, decode, detect, region features,
Parquet shards, report), the baseline with `use_ray=False`: one process, one batch after another,
torch and OpenCV at their default thread counts (all cores), which is what a plain script gets.
The Ray side is timed after `ray.init` (reported apart as `ray_init_s`) but includes actor start-up
and model loading. Both outputs are compared (tags equal, feature difference), so a faster
pipeline that computes something else would show.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from raysys import config

# Caption words per tag: the word and its plural. "person" is rare in captions (they say man,
# woman, child...), so a broad variant is reported beside the strict one.
TAG_WORDS: dict[str, tuple[str, list[str]]] = {
    "dog": ("dog", ["dog", "dogs"]),
    "person": ("person", ["person", "persons", "people"]),
    "person (broad)": (
        "person",
        ["person", "persons", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls",
         "child", "children", "kid", "kids", "player", "players", "lady", "ladies", "guy", "guys", "baby"],
    ),
    "bicycle": ("bicycle", ["bicycle", "bicycles", "bike", "bikes"]),
    "car": ("car", ["car", "cars"]),
    "horse": ("horse", ["horse", "horses"]),
}


def _default_flickr() -> Path:
    root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("RAYSYS_SHARED", root.parent / "shared")) / "data" / "flickr8k"


def add_arguments(p: argparse.ArgumentParser) -> None:
    fl = _default_flickr()
    p.add_argument("--images", default=str(fl / "images"), help="image folder (default: shared Flickr8k photos)")
    p.add_argument("--limit", type=int, default=300, help="images to featurize on each side (default 300)")
    p.add_argument("--captions", default=str(fl / "captions.tsv"), help="captions TSV (image, caption_index, caption)")
    p.add_argument("--split", default=str(fl / "split.tsv"), help="split TSV (image, split); train images go first")
    p.add_argument("--dataset", default=None,
                   help="also measure tag quality on this already-featurized dataset (e.g. the full 5,000 photos)")
    p.add_argument("--actors", type=int, default=0, help="actor pool size (default: one per CPU)")
    p.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray started for the bench (default: all)")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="torch/OpenCV threads of the single-process baseline (default: their own defaults)")
    p.add_argument("--keep", default=None, help="keep both outputs under this directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="featurize config overrides")


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's raylet, GCS and
    workers are descendants of a locally started Ray) in a background thread; keeps the peak.
    RSS counts pages shared between processes (e.g. the object store mapping) once per process,
    so this is an upper bound."""

    def __init__(self, interval: float = 0.2):
        import psutil  # lazy: `raysys bench` imports this module at raysys --help

        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()
        self.peak_procs = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        import psutil  # lazy: `raysys bench` imports this module at raysys --help

        total, n = 0, 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if total > self.peak:
            self.peak, self.peak_procs = total, n
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def read_captions(captions: str | os.PathLike) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(captions, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            out.setdefault(row["image"], []).append(row["caption"].lower())
    return out


def read_split(split: str | os.PathLike) -> dict[str, str]:
    if not split or not Path(split).exists():
        return {}
    with open(split, newline="") as f:
        return {row["image"]: row["split"] for row in csv.DictReader(f, delimiter="\t")}


def tag_quality(dataset: str | os.PathLike, captions: dict[str, list[str]], split: dict[str, str],
                which: str = "train") -> dict[str, Any]:
    """For each tag word: among images whose captions mention it, the share tagged with it by the
    detector (recall-like), and among images whose captions never mention it, the share tagged
    with it anyway (false-tag rate). Only images of split `which` that have captions count."""
    from raysys.contract import read_table  # lazy: `raysys bench` imports this module at raysys --help

    t = read_table(dataset, "images", columns=["image_id", "tags", "class_ids"])
    tagged: dict[str, set[str]] = {}
    for iid, tags, cids in zip(t.column("image_id").to_pylist(), t.column("tags").to_pylist(),
                               t.column("class_ids").to_pylist()):
        tagged[iid] = {tag for tag, c in zip(tags, cids) if c >= 0}
    ids = [i for i in tagged if i in captions and (not split or split.get(i) == which)]
    words: dict[str, Any] = {}
    for label, (tag, forms) in TAG_WORDS.items():
        rx = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b")
        mention = [i for i in ids if any(rx.search(c) for c in captions[i])]
        mset = set(mention)
        rest = [i for i in ids if i not in mset]
        words[label] = {
            "tag": tag,
            "caption_words": forms,
            "mentioned": len(mention),
            "tagged_given_mentioned": round(sum(tag in tagged[i] for i in mention) / len(mention), 4) if mention else None,
            "not_mentioned": len(rest),
            "tagged_given_not_mentioned": round(sum(tag in tagged[i] for i in rest) / len(rest), 4) if rest else None,
        }
    return {"split": which if split else "all", "images": len(ids), "words": words}


def format_quality(q: dict[str, Any], title: str) -> str:
    lines = [f"tag quality vs captions ({title}; {q['images']} {q['split']} images)",
             f"  {'word':<16}{'mentioned':>10}{'tagged|mentioned':>18}{'not mentioned':>15}{'tagged|not':>12}"]
    for label, w in q["words"].items():
        a = "-" if w["tagged_given_mentioned"] is None else f"{w['tagged_given_mentioned']:.3f}"
        b = "-" if w["tagged_given_not_mentioned"] is None else f"{w['tagged_given_not_mentioned']:.3f}"
        lines.append(f"  {label:<16}{w['mentioned']:>10}{a:>18}{w['not_mentioned']:>15}{b:>12}")
    return "\n".join(lines)


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    import numpy as np  # lazy: `raysys bench` imports this module at raysys --help

    from raysys.contract import read_table, region_arrays  # lazy: see tag_quality

    ta = read_table(a, "images").sort_by("image_id")
    tb = read_table(b, "images").sort_by("image_id")
    same_ids = ta.column("image_id").to_pylist() == tb.column("image_id").to_pylist()
    same_tags = same_ids and ta.column("tags").to_pylist() == tb.column("tags").to_pylist()
    diff = None
    if same_tags:
        fa = region_arrays(ta)["features"].astype(np.float32)
        fb = region_arrays(tb)["features"].astype(np.float32)
        diff = float(np.abs(fa - fb).max()) if fa.size else 0.0
    return {"same_image_ids": same_ids, "same_tags": same_tags, "max_feature_diff": diff}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray  # lazy: `raysys bench` imports this module at raysys --help

    from raysys.data.featurize import FeaturizeConfig, featurize, list_inputs  # lazy: as ray, above
    from raysys.raycluster import ensure_ray  # lazy: `raysys bench` imports this module at raysys --help

    cfg = config.from_dict(FeaturizeConfig, config.apply_overrides({}, args.overrides))
    if args.actors:
        cfg.actors = args.actors
    split = read_split(args.split)
    captions = read_captions(args.captions) if Path(args.captions).exists() else {}
    root, files = list_inputs(args.images)
    # Train-split photos first, so that the tag-quality table of the bench run uses train images.
    files.sort(key=lambda f: (split.get(f.name, "train") != "train", f.relative_to(root).as_posix()))
    files = files[: args.limit]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="raysys-bench-featurize-"))
    out_base, out_ray = work / "baseline", work / "ray"
    for d in (out_base, out_ray):
        if d.exists():
            shutil.rmtree(d)
    cfg.shard_size = max(cfg.shard_size, 1)

    import cv2  # lazy: `raysys bench` imports this module at raysys --help
    import torch  # lazy: `raysys bench` imports this module at raysys --help

    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
        cv2.setNumThreads(args.baseline_threads)
    base_threads = {"torch": torch.get_num_threads(), "opencv": cv2.getNumThreads()}

    # 1. the plain single-process loop (no Ray running yet, so the tree is just this process)
    with TreeRSS() as mem_base:
        t0 = time.perf_counter()
        rep_base = featurize(cfg, files, out_base, use_ray=False)
        base_s = time.perf_counter() - t0

    # 2. the Ray Data pipeline on the same files
    with TreeRSS() as mem_ray:
        t0 = time.perf_counter()
        started = ensure_ray(args.cpus or None)
        ray_init_s = time.perf_counter() - t0
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            t0 = time.perf_counter()
            rep_ray = featurize(cfg, files, out_ray, use_ray=True)
            ray_s = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()

    n = len(files)
    result: dict[str, Any] = {
        "bench": "featurize",
        "images": n,
        "images_ok": rep_ray["images"],
        "failed": rep_ray["failed"],
        "images_per_s": round(n / ray_s, 2),
        "baseline_images_per_s": round(n / base_s, 2),
        "ratio": round(base_s / ray_s, 3),
        "seconds": round(ray_s, 2),
        "baseline_seconds": round(base_s, 2),
        "baseline_threads": base_threads,
        "ray_init_s": round(ray_init_s, 2),
        "cpus": cpus,
        "actors": cfg.actors or cpus,
        "peak_rss_mb": round(mem_ray.peak / 2**20, 1),
        "peak_rss_processes": mem_ray.peak_procs,
        "baseline_peak_rss_mb": round(mem_base.peak / 2**20, 1),
        "ru_maxrss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ru_maxrss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "worker_seconds": rep_ray["worker_seconds"],
        "baseline_worker_seconds": rep_base["worker_seconds"],
        "regions_mean": rep_ray["regions_mean"],
        "with_detection_share": rep_ray["with_detection_share"],
        "outputs_match": compare_outputs(out_base, out_ray),
        "output": str(work) if args.keep else None,
    }
    if captions:
        q = tag_quality(out_ray, captions, split)
        print(format_quality(q, f"bench run, {n} images"))
        result["tag_quality"] = q
        if args.dataset:
            qd = tag_quality(args.dataset, captions, split)
            print(format_quality(qd, f"dataset {args.dataset}"))
            result["tag_quality_dataset"] = qd
    print(
        f"featurize bench: ray {result['images_per_s']} images/s vs single process "
        f"{result['baseline_images_per_s']} images/s (ratio {result['ratio']}), "
        f"peak RSS {result['peak_rss_mb']} MB over {result['peak_rss_processes']} processes"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result
