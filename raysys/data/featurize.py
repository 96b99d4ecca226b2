"""Real images -> regions: the images table of the data contract, built on Ray Data.

The paper starts from detector output (regions with features, boxes and object tags); users start
from folders of photos. `featurize` runs

    list files -> plan shards -> Ray Data actor pool [read -> decode -> detect -> region features]
               -> driver groups rows by shard -> atomic Parquet shard + per-shard sidecar -> report

* **Pluggable**: the detector and region-feature backends come from `raysys.data.detectors`' registries.
* **Regions**: the detections (score-sorted, at most `max_regions - 1`), then always the whole
  image; when the detector finds nothing, also a `grid` x `grid` set of cells, so every image has
  local regions. Non-detection regions carry tag `""`, class id `-1` and score 0: they have no
  detector class, and downstream code must not mistake them for one.
* **Restartable**: input files are sorted and cut into fixed shards, so shard i always holds the
  same files. A shard exists only when complete (hidden temp name, then rename), and a re-run skips
  every shard whose Parquet file exists and whose sidecar names the same files and settings.
* **Bad input never crashes the run**: unreadable, non-image, corrupt or truncated files and
  images that are too small or too large are failures, counted and listed per file in the report;
  grayscale, alpha, 16-bit, CMYK, EXIF-rotated and oversized images are converted and listed as
  handled. With `strict`, the first failure stops the run with a one-line error naming the file.
"""

from __future__ import annotations

import glob as globlib
import importlib
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from raysys import config as configlib
from raysys import progress
from raysys.contract import (
    ContractError,
    ImageRecord,
    images_schema,
    images_table,
    shard_files,
    shard_name,
    update_manifest,
    write_parquet_atomic,
    write_text_atomic,
)
from raysys.data.detectors import get_detector, get_features, grid_boxes, resolve_backend
from raysys.raycluster import ensure_ray

log = logging.getLogger(__name__)

REPORT = "featurize_report.json"
SIDECAR_DIR = Path("diagnostics") / "featurize"
# Columns the actors add beside the contract's; dropped before a shard is written.
EXTRA_COLUMNS = ("path", "shard", "order", "error", "notes", "n_detections", "t_read", "t_detect", "t_features")


@dataclass
class FeaturizeConfig:
    """Options of `raysys featurize` (YAML section `featurize`)."""

    backend: str = "yolo-effnet"  # a registered backend, or DETECTOR+FEATURES
    detector: str | None = None  # overrides the backend's detector
    features: str | None = None  # overrides the backend's region-feature backend
    plugins: list[str] = field(default_factory=list)  # modules to import first (they register backends)
    max_regions: int = 20  # per image, including the whole-image region
    min_score: float = 0.2  # detector score threshold
    nms_iou: float = 0.45
    detector_input: int = 416
    feature_input: int = 224
    roi_pool: int = 2  # RoIAlign bins per side, averaged into one vector
    feature_batch: int = 1  # images per feature-network forward (1 is fastest on one CPU thread)
    grid: int = 2  # fallback grid (grid x grid cells) when nothing is detected; 0 = none
    imagenet_top: int = 5  # > 0: also store the feature network's top ImageNet labels per image (image_tags); 0 = off
    imagenet_min_score: float = 0.05  # labels below this probability are dropped (the best one is always kept)
    max_side: int = 1024  # larger images are downscaled before detection (boxes stay in original pixels)
    min_side: int = 8  # smaller images are failures
    max_pixels: int = 100_000_000  # larger images are failures (decompression bombs)
    max_file_mb: float = 256.0  # larger files are failures without being read
    shard_size: int = 500  # images per output shard (the restart unit)
    batch_size: int = 16  # images per actor call (one batched feature forward)
    actors: int = 0  # 0: one per cluster CPU
    cpus_per_actor: float = 0.5  # fractional: whole CPUs for every actor deadlock reads on small nodes
    threads_per_actor: int = 1  # torch + OpenCV threads inside each actor
    strict: bool = False  # the first bad file fails the run
    seed: int = 0  # inference is deterministic; kept for the stage convention

    def check(self) -> None:
        if self.max_regions < 1:
            raise configlib.ConfigError("featurize.max_regions: must be >= 1 (the whole-image region)")
        if self.shard_size < 1 or self.batch_size < 1:
            raise configlib.ConfigError("featurize.shard_size and batch_size must be >= 1")
        if not 0.0 < self.min_score <= 1.0:
            raise configlib.ConfigError(f"featurize.min_score: {self.min_score} is not in (0, 1]")
        if self.grid < 0:
            raise configlib.ConfigError("featurize.grid: must be >= 0")
        if self.imagenet_top < 0 or not 0.0 <= self.imagenet_min_score <= 1.0:
            raise configlib.ConfigError("featurize.imagenet_top must be >= 0 and imagenet_min_score in [0, 1]")

    def backends(self) -> tuple[str, str]:
        import_plugins(self.plugins)
        try:
            det, feat = resolve_backend(self.backend)
        except KeyError as e:
            raise configlib.ConfigError(f"featurize.backend: {e.args[0]}") from None
        return self.detector or det, self.features or feat

    def output_settings(self) -> dict[str, Any]:
        """What determines a shard's content: a re-run with other values must not mix shards."""
        det, feat = self.backends()
        keys = ("max_regions", "min_score", "nms_iou", "detector_input", "feature_input", "roi_pool", "grid", "max_side")
        if self.labels(feat):  # only then: shards written without labels stay valid
            keys += ("imagenet_top", "imagenet_min_score")
        return {"detector": det, "features": feat, **{k: getattr(self, k) for k in keys}}

    def labels(self, feat_name: str) -> bool:
        """Are ImageNet labels stored? `imagenet_top > 0` and the region-feature backend has an image
        classifier head (efficientnet-lite0 has; a plugin backend without one simply stores none)."""
        return self.imagenet_top > 0 and get_features(feat_name).label_vocabulary() is not None


# Optional images-table columns of `imagenet_top`: whole-image classifier labels (readable names,
# best first) and their probabilities. Image-side only: they come from the image, never a caption.
LABEL_COLUMNS = (("image_tags", pa.list_(pa.string())), ("image_tag_scores", pa.list_(pa.float32())))


def import_plugins(modules: list[str]) -> None:
    for m in modules:
        importlib.import_module(m)


# ---------------------------------------------------------------- inputs and shards


def list_inputs(spec: str | os.PathLike | list[str | os.PathLike]) -> tuple[Path, list[Path]]:
    """A directory (walked recursively), a glob pattern, or an explicit list of files ->
    (root, sorted files); image ids are paths relative to root.

    Every regular file counts, images or not: a stray README in a photo folder is reported as a
    failure rather than silently skipped. Hidden files and folders are ignored.
    """
    if isinstance(spec, (list, tuple)):
        files = [Path(f) for f in spec]
        if not files:
            raise ContractError("<file list>", None, "images", "no files given")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        files.sort(key=lambda f: f.relative_to(root).as_posix())
        return root, files
    spec = str(spec)
    p = Path(spec)
    if p.is_dir():
        root = p
        files = []
        for dp, dns, fns in os.walk(p):
            dns[:] = [d for d in dns if not d.startswith(".")]  # prune hidden folders
            files += [Path(dp) / f for f in fns if not f.startswith(".")]
    else:
        magic = next((i for i, part in enumerate(p.parts) if globlib.has_magic(part)), None)
        if magic is None:
            raise ContractError(spec, None, "images", "no such directory, and not a glob pattern")
        root = Path(*p.parts[:magic]) if magic else Path(".")
        files = [Path(f) for f in globlib.glob(spec, recursive=True) if Path(f).is_file()]
        files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ContractError(spec, None, "images", "no files found")
    return root, files


def image_id_of(root: Path, f: Path) -> str:
    """The file's path relative to the input root (POSIX), extension kept: for Flickr8k this is
    exactly the `image` column of captions.tsv, so captions join without a mapping table."""
    return f.relative_to(root).as_posix()


def plan_shards(ids: list[str], shard_size: int) -> list[list[str]]:
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]


# ---------------------------------------------------------------- decoding with bad-input handling


class BadImage(Exception):
    """A file that cannot become an image; the message is the reason in the report."""


@dataclass
class Decoded:
    rgb: np.ndarray  # (h, w, 3) uint8, possibly downscaled
    width: int  # original (display) size: what boxes are expressed in
    height: int
    notes: list[str]


def read_file(path: str | os.PathLike, max_file_mb: float) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > max_file_mb * 2**20:
            raise BadImage(f"file too large ({size / 2**20:.0f} MB > {max_file_mb:g} MB)")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None


_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its magic bytes: tells 'corrupt JPEG' from 'not an image'."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def decode_image(data: bytes, max_side: int = 1024, min_side: int = 8, max_pixels: int = 100_000_000) -> Decoded:
    """Bytes -> RGB uint8, or BadImage. Pillow rather than cv2.imdecode because Pillow raises on a
    truncated JPEG/PNG (cv2 returns a half-grey image with only a warning on stderr), reads the
    size from the header before decoding (so decompression bombs are refused cheaply), and can
    decode big JPEGs at 1/2, 1/4, 1/8 scale (`draft`)."""
    if not data:
        raise BadImage("empty file")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        fmt = _sniff(data)
        raise BadImage(f"corrupt {fmt}: header unreadable" if fmt else "not an image (unrecognised format)") from None
    fmt = im.format or "image"
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} is over {max_pixels} pixels")
    if min(w, h) < min_side:
        raise BadImage(f"too small: {w}x{h} (min side {min_side} px)")
    if getattr(im, "n_frames", 1) > 1:
        notes.append("multi-frame: first frame used")
    try:
        if fmt == "JPEG" and max(w, h) > 2 * max_side:
            f = max_side / max(w, h)
            im.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))  # DCT-domain downscale; size stays >= asked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated {fmt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        notes.append(f"exif-rotated (orientation {orientation})")
        if orientation in (5, 6, 7, 8):
            w, h = h, w
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        notes.append("grayscale")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
        notes.append("high bit depth: scaled to 8 bit")
    elif mode == "CMYK":
        notes.append("CMYK: converted to RGB")
    if has_alpha:
        notes.append("alpha: composited on white")
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if max(im.size) > max_side:
        f = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.BILINEAR, reducing_gap=3.0)
        notes.append(f"downscaled from {w}x{h}")
    return Decoded(np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), w, h, notes)


# ---------------------------------------------------------------- regions of one image


def assemble_regions(det: Any, width: int, height: int, max_regions: int, grid: int) -> dict[str, np.ndarray]:
    """Detections (already score-sorted) + the whole image + the grid fallback, in the *processing*
    image's pixels; `n_detections` says how many leading regions are real detections."""
    b = det.boxes.reshape(-1, 4)
    ok = ((b[:, 2] - b[:, 0]) >= 1.0) & ((b[:, 3] - b[:, 1]) >= 1.0)  # drop degenerate boxes
    n_det = min(int(ok.sum()), max_regions - 1)
    boxes = [b[ok][:n_det].astype(np.float32)]
    extra = [np.array([[0, 0, width, height]], np.float32)]
    if n_det == 0 and grid > 1:
        extra.append(grid_boxes(width, height, grid))
    extra_b = np.concatenate(extra)[: max_regions - n_det]
    n_extra = len(extra_b)
    return {
        "boxes": np.concatenate(boxes + [extra_b]),
        "scores": np.concatenate([det.scores[ok][:n_det], np.zeros(n_extra, np.float32)]).astype(np.float32),
        "class_ids": np.concatenate([det.class_ids[ok][:n_det], np.full(n_extra, -1, np.int32)]).astype(np.int32),
        "n_detections": np.int32(n_det),
    }


# ---------------------------------------------------------------- the per-batch worker


class Featurizer:
    """Loads the backends once; `__call__` turns a batch of files into images-table rows.

    Used as the Ray Data actor class and, unchanged, by the single-process baseline of the bench.
    Returns an Arrow table (contract columns + bookkeeping), so ragged region lists cross the
    object store without Ray's tensor extension types.
    """

    def __init__(self, cfg: dict[str, Any], set_threads: bool = True):
        import cv2  # lazy: the backends' libraries load in the actors, not in the driver that plans shards
        import torch  # lazy: as cv2

        self.cfg = configlib.from_dict(FeaturizeConfig, cfg)
        if set_threads:
            torch.set_num_threads(self.cfg.threads_per_actor)
            cv2.setNumThreads(self.cfg.threads_per_actor)
        det_name, feat_name = self.cfg.backends()
        c = self.cfg
        self.detector = get_detector(det_name)(
            min_score=c.min_score, nms_iou=c.nms_iou, input_size=c.detector_input, max_regions=c.max_regions
        )
        feat_cls = get_features(feat_name)
        self.featurizer = feat_cls(input_size=c.feature_input, roi_pool=c.roi_pool, forward_batch=c.feature_batch)
        self.labels = c.labels(feat_name)
        self.dim = feat_cls.feature_dim()
        self.vocab = type(self.detector).vocabulary()
        self.source = f"featurize:{det_name}+{feat_name}"

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        c = self.cfg
        t0 = time.perf_counter()
        n = len(batch["path"])
        decoded: list[Decoded | None] = [None] * n
        errors = [""] * n
        for i, path in enumerate(batch["path"]):
            try:
                decoded[i] = decode_image(read_file(str(path), c.max_file_mb), c.max_side, c.min_side, c.max_pixels)
            except BadImage as e:
                errors[i] = str(e)
        good = [i for i in range(n) if decoded[i] is not None]
        imgs = [decoded[i].rgb for i in good]
        t1 = time.perf_counter()
        dets = self.detector.detect(imgs) if imgs else []
        regions = [
            assemble_regions(d, im.shape[1], im.shape[0], c.max_regions, c.grid) for d, im in zip(dets, imgs)
        ]
        t2 = time.perf_counter()
        labels: list[Any] = []
        if self.labels:
            feats, labels = self.featurizer.features_and_labels(
                imgs, [r["boxes"] for r in regions], c.imagenet_top, c.imagenet_min_score
            )
        else:
            feats = self.featurizer.features(imgs, [r["boxes"] for r in regions]) if imgs else []
        t3 = time.perf_counter()

        records: list[ImageRecord] = []
        n_det = np.zeros(n, np.int32)
        by_pos = dict(zip(good, range(len(good))))
        for i in range(n):
            image_id = str(batch["image_id"][i])
            if i not in by_pos:
                records.append(_empty_record(image_id, self.dim, self.source))
                continue
            k = by_pos[i]
            d, r, im = decoded[i], regions[k], imgs[k]
            sx, sy = d.width / im.shape[1], d.height / im.shape[0]
            boxes = r["boxes"] * np.array([sx, sy, sx, sy], np.float32)
            boxes = np.minimum(boxes, np.array([d.width, d.height, d.width, d.height], np.float32))
            cids = r["class_ids"]
            f = feats[k]
            if not np.isfinite(f).all() or np.abs(f).max(initial=0.0) > 65504.0:  # float16 on disk
                errors[i] = "region features not finite in float16"
                records.append(_empty_record(image_id, self.dim, self.source))
                continue
            n_det[i] = r["n_detections"]
            records.append(
                ImageRecord(
                    image_id=image_id,
                    width=d.width,
                    height=d.height,
                    boxes=boxes,
                    features=f,
                    tags=[self.vocab[j] if j >= 0 else "" for j in cids],
                    tag_scores=r["scores"],
                    class_ids=cids,
                    source=self.source,
                )
            )
        table = images_table(records, self.dim)
        if self.labels:
            table = _append_labels(table, [labels[by_pos[i]] if i in by_pos and not errors[i] else None for i in range(n)])
        per = 1.0 / max(n, 1)
        extra = {
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "shard": pa.array(np.asarray(batch["shard"], np.int32)),
            "order": pa.array(np.asarray(batch["order"], np.int32)),
            "error": pa.array(errors, pa.string()),
            "notes": pa.array(["; ".join(d.notes) if d is not None else "" for d in decoded], pa.string()),
            "n_detections": pa.array(n_det),
            "t_read": pa.array(np.full(n, (t1 - t0) * per, np.float32)),
            "t_detect": pa.array(np.full(n, (t2 - t1) * per, np.float32)),
            "t_features": pa.array(np.full(n, (t3 - t2) * per, np.float32)),
        }
        for name, col in extra.items():
            table = table.append_column(name, col)
        return table


def _append_labels(table: Any, labels: list[Any]) -> Any:
    """The LABEL_COLUMNS of a batch: an image without labels (a failure) gets empty lists."""
    names = [list(lab.names) if lab is not None else [] for lab in labels]
    scores = [np.asarray(lab.scores, np.float32).tolist() if lab is not None else [] for lab in labels]
    for (name, typ), col in zip(LABEL_COLUMNS, (names, scores)):
        table = table.append_column(name, pa.array(col, typ))
    return table


def _empty_record(image_id: str, dim: int, source: str) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        width=0,
        height=0,
        boxes=np.zeros((0, 4), np.float32),
        features=np.zeros((0, dim), np.float16),
        tags=[],
        tag_scores=np.zeros(0, np.float32),
        class_ids=np.zeros(0, np.int32),
        source=source,
    )


# ---------------------------------------------------------------- Ray


def _actor_count(cfg: FeaturizeConfig) -> int:
    import ray  # lazy: ~2 s that a --no-ray run never needs

    if cfg.actors > 0:
        return cfg.actors
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_ray(cfg: FeaturizeConfig, items: list[dict[str, Any]]):
    """Yield Arrow tables of featurized rows, streaming, as the actor pool finishes batches."""
    import ray  # lazy: ~2 s that a --no-ray run never needs

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
    ds = ds.map_batches(
        Featurizer,
        fn_constructor_kwargs={"cfg": configlib.to_dict(cfg)},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=_actor_count(cfg)),  # `concurrency=` is deprecated in 2.5x
        num_cpus=cfg.cpus_per_actor,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def run_local(cfg: FeaturizeConfig, items: list[dict[str, Any]], set_threads: bool = False):
    """The same work in this process, one batch after another: the bench's baseline, and a way
    to featurize a handful of files without starting Ray."""
    fz = Featurizer(configlib.to_dict(cfg), set_threads=set_threads)
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i : i + cfg.batch_size]
        yield fz({k: np.array([it[k] for it in chunk]) for k in ("path", "image_id", "shard", "order")})


# ---------------------------------------------------------------- the stage


def featurize(
    cfg: FeaturizeConfig,
    images: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Featurize every file under `images` (see `list_inputs`) into `out`, a dataset directory;
    return the report (also written to `out/featurize_report.json`)."""
    cfg.check()
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():  # refused before the models load, not after the work
        raise configlib.ConfigError(f"{out}: exists and is not a directory; --out names a dataset directory")
    det_name, feat_name = cfg.backends()
    if cfg.imagenet_top > 0 and not cfg.labels(feat_name):
        log.warning("featurize: region-feature backend %r has no image classifier: no ImageNet labels stored", feat_name)
    dim = get_features(feat_name).feature_dim()
    vocab = get_detector(det_name).vocabulary()
    settings = cfg.output_settings()
    root, files = list_inputs(images)
    ids = [image_id_of(root, f) for f in files]
    path_of = dict(zip(ids, (str(f) for f in files)))
    shards = plan_shards(ids, cfg.shard_size)
    pending = _pending_shards(out, shards, settings)
    log.info("featurize: %d files, %d shards (%d to do) -> %s", len(ids), len(shards), len(pending), out)

    items = [
        {"path": path_of[iid], "image_id": iid, "shard": s, "order": j}
        for s in pending
        for j, iid in enumerate(shards[s])
    ]
    started = False
    t_run = time.perf_counter()
    timing = {"t_read": 0.0, "t_detect": 0.0, "t_features": 0.0}
    if items:
        if use_ray:
            started = ensure_ray()
            stream = run_ray(cfg, items)
        else:
            stream = run_local(cfg, items)
        parts: dict[int, list[pa.Table]] = {s: [] for s in pending}
        seen = dict.fromkeys(pending, 0)
        try:
            for table in progress.track(stream, total=len(items), desc="featurize", unit="img", weight=len):
                if cfg.strict:
                    _raise_first_failure(table)
                for name in timing:
                    timing[name] += float(np.sum(table.column(name).to_numpy()))
                shard_col = table.column("shard").to_numpy()
                for s in np.unique(shard_col):
                    s = int(s)
                    part = table.filter(pa.array(shard_col == s))
                    parts[s].append(part)
                    seen[s] += part.num_rows
                    if seen[s] == len(shards[s]):
                        _write_shard(out, s, shards[s], pa.concat_tables(parts.pop(s)), dim, settings, path_of)
        finally:
            if started:
                import ray  # lazy: ~2 s that a --no-ray run never needs

                ray.shutdown()
        missing = [s for s in parts if s in pending]
        if missing:
            raise RuntimeError(f"featurize: shards {missing} did not receive all their rows")
    run_seconds = time.perf_counter() - t_run

    report = build_report(out, shards, dim)
    report.update(
        {
            "backend": {"detector": det_name, "features": feat_name},
            "settings": settings,
            "input": _describe(images),
            "shards": len(shards),
            "shards_written": len(pending),
            "shards_skipped": len(shards) - len(pending),
            "processed_this_run": len(items),
            "seconds": round(time.perf_counter() - t_start, 2),
            "images_per_s_this_run": round(len(items) / run_seconds, 2) if items and run_seconds > 0 else None,
            "worker_seconds": {k: round(v, 2) for k, v in timing.items()},
        }
    )
    write_text_atomic(out / REPORT, json.dumps(report, indent=2))
    update_manifest(
        out,
        "featurize",
        feature_dim=dim,
        tag_vocab=vocab,
        counts={"images": report["images"]},
        provenance={"detector": det_name, "features": feat_name, "input": _describe(images), "failed": report["failed"],
                    **({"image_tags": f"{feat_name} ImageNet top {cfg.imagenet_top} (p >= {cfg.imagenet_min_score:g})"}
                       if cfg.labels(feat_name) else {})},
    )  # fmt: skip
    return report


def _describe(images: Any) -> str:
    return f"{len(images)} listed files" if isinstance(images, (list, tuple)) else str(images)


def _raise_first_failure(table: Any) -> None:
    err = table.column("error").to_pylist()
    for i, e in enumerate(err):
        if e:
            raise ContractError(table.column("path")[i].as_py(), None, "image", e)


def _sidecar(out: Path, s: int) -> Path:
    return out / SIDECAR_DIR / shard_name(s).replace(".parquet", ".json")


def _pending_shards(out: Path, shards: list[list[str]], settings: dict[str, Any]) -> list[int]:
    """Shards still to do. A finished shard is skipped only if its sidecar names the same files and
    settings: mixing shards of another input list or detector threshold would corrupt the table."""
    existing = {p.name: p for p in shard_files(out, "images")}
    pending = []
    for s, ids in enumerate(shards):
        name = shard_name(s)
        if name not in existing:
            pending.append(s)
            continue
        existing.pop(name)
        side = _sidecar(out, s)
        meta = json.loads(side.read_text()) if side.exists() else None
        if meta is None or meta.get("image_ids") != ids or meta.get("settings") != settings:
            what = "was not written by featurize" if meta is None else (
                "holds other files" if meta.get("image_ids") != ids else "was written with other settings"
            )
            raise ContractError(
                out / "images" / name, None, "images", f"existing shard {what}; use a new --out or delete {out / 'images'}"
            )
    if existing:
        raise ContractError(
            out / "images", None, "images", f"shards {sorted(existing)} are not part of this input; use a new --out"
        )
    return pending


def _write_shard(
    out: Path, s: int, ids: list[str], table: Any, dim: int, settings: dict[str, Any], path_of: dict[str, str]
) -> None:
    """Sidecar first, then the shard: the shard's rename is the commit point."""
    table = table.sort_by("order")
    errors = table.column("error").to_pylist()
    notes = table.column("notes").to_pylist()
    row_ids = table.column("image_id").to_pylist()
    failures = [{"file": path_of[i], "image_id": i, "reason": e} for i, e in zip(row_ids, errors) if e]
    handled = [{"file": path_of[i], "image_id": i, "notes": n} for i, n, e in zip(row_ids, notes, errors) if n and not e]
    ok = pa.array([not e for e in errors])
    good = table.filter(ok)
    meta = {
        "shard": shard_name(s),
        "image_ids": ids,
        "settings": settings,
        "images": good.num_rows,
        "failures": failures,
        "handled": handled,
        "n_detections": good.column("n_detections").to_pylist(),
    }
    write_text_atomic(_sidecar(out, s), json.dumps(meta))
    schema = images_schema(dim)
    if "image_tags" in good.column_names:
        for name, typ in LABEL_COLUMNS:
            schema = schema.append(pa.field(name, typ))
    write_parquet_atomic(good.select(schema.names).cast(schema), out / "images" / shard_name(s))
    log.info("featurize: wrote %s (%d images, %d failed)", shard_name(s), good.num_rows, len(failures))


# ---------------------------------------------------------------- the report


def build_report(out: Path, shards: list[list[str]], dim: int) -> dict[str, Any]:
    """Figures over all shards of the plan (this run's and earlier runs'), from the shards' tags
    and the sidecars: a resumed run reports the whole dataset, not just what it just did."""
    failures: list[dict[str, Any]] = []
    handled: list[dict[str, Any]] = []
    n_regions: list[np.ndarray] = []
    n_dets: list[int] = []
    tag_regions: dict[str, int] = {}
    tag_images: dict[str, int] = {}
    label_images: dict[str, int] = {}
    n_labels: list[int] = []
    for s in range(len(shards)):
        meta = json.loads(_sidecar(out, s).read_text())
        failures += meta["failures"]
        handled += meta["handled"]
        n_dets += meta["n_detections"]
        path = out / "images" / shard_name(s)
        if "image_tags" in pq.read_schema(path).names:
            for row in pq.read_table(path, columns=["image_tags"]).column(0).to_pylist():
                n_labels.append(len(row))
                for name in set(row):
                    label_images[name] = label_images.get(name, 0) + 1
        t = pq.read_table(path, columns=["tags", "class_ids"])
        cids = t.column("class_ids").combine_chunks()
        n_regions.append(np.asarray(cids.value_lengths().to_numpy(zero_copy_only=False)))
        for row_tags, row_ids in zip(t.column("tags").to_pylist(), cids.to_pylist()):
            real = [tag for tag, c in zip(row_tags, row_ids) if c >= 0]
            for tag in real:
                tag_regions[tag] = tag_regions.get(tag, 0) + 1
            for tag in set(real):
                tag_images[tag] = tag_images.get(tag, 0) + 1
    regions = np.concatenate(n_regions) if n_regions else np.zeros(0, np.int64)
    dets = np.asarray(n_dets, np.int64)
    n = int(len(regions))
    reasons: dict[str, int] = {}
    for f in failures:
        key = f["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    notes: dict[str, int] = {}
    for h in handled:
        for note in h["notes"].split("; "):
            key = note.split(" (")[0].split(" from ")[0].split(":")[0]
            notes[key] = notes.get(key, 0) + 1
    return {
        "files": sum(len(s) for s in shards),
        "images": n,
        "failed": len(failures),
        "regions_total": int(regions.sum()),
        "regions_mean": round(float(regions.mean()), 3) if n else 0.0,
        "regions_min": int(regions.min()) if n else 0,
        "regions_max": int(regions.max()) if n else 0,
        "detections_mean": round(float(dets.mean()), 3) if n else 0.0,
        "with_detection_share": round(float((dets > 0).mean()), 4) if n else 0.0,
        "feature_dim": dim,
        "tag_histogram": dict(sorted(tag_regions.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tag_images": dict(sorted(tag_images.items(), key=lambda kv: (-kv[1], kv[0]))),
        **({"image_tags_mean": round(float(np.mean(n_labels)), 3),
            "image_tag_images": dict(sorted(label_images.items(), key=lambda kv: (-kv[1], kv[0])))}
           if n_labels else {}),  # fmt: skip
        "failure_reasons": reasons,
        "failures": failures,
        "handled_counts": notes,
        "handled": handled,
    }


def format_summary(report: dict[str, Any], out: str | os.PathLike, max_list: int = 10) -> str:
    """The human summary `raysys featurize` prints."""
    r = report
    lines = [
        f"featurize: {r['images']} images from {r['files']} files ({r['failed']} failed) -> {out}",
        f"  backend: {r['backend']['detector']} + {r['backend']['features']} (feature dim {r['feature_dim']})",
        f"  regions per image: mean {r['regions_mean']}, min {r['regions_min']}, max {r['regions_max']}"
        f" (total {r['regions_total']})",
        f"  with >= 1 detection: {100 * r['with_detection_share']:.1f} %   detections per image: {r['detections_mean']}",
        "  top tags (regions): "
        + (", ".join(f"{k} {v}" for k, v in list(r["tag_histogram"].items())[:12]) or "none"),
        f"  shards: {r['shards']} ({r['shards_written']} written, {r['shards_skipped']} already done);"
        f" {r['seconds']} s" + (f", {r['images_per_s_this_run']} images/s" if r.get("images_per_s_this_run") else ""),
    ]
    if r.get("image_tag_images"):
        lines.append(
            f"  ImageNet labels per image: {r['image_tags_mean']}; top: "
            + ", ".join(f"{k} {v}" for k, v in list(r["image_tag_images"].items())[:12])
        )
    if r["handled_counts"]:
        lines.append("  handled: " + ", ".join(f"{k} {v}" for k, v in r["handled_counts"].items()))
    if r["failures"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in r["failure_reasons"].items()))
        for f in r["failures"][:max_list]:
            lines.append(f"    {f['file']}: {f['reason']}")
        if len(r["failures"]) > max_list:
            lines.append(f"    ... {len(r['failures']) - max_list} more in {REPORT}")
    lines.append(f"  report: {Path(out) / REPORT}")
    return "\n".join(lines)
