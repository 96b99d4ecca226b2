"""What zero-shot retrieval and fine-tuning share: the model under evaluation (a checkpoint or
`base`), images as region arrays, and batches of (image, text) pairs in the model's input layout.

Why one place: pre-training, zero-shot scoring and every fine-tuning task must feed the encoder
the same way (`[CLS] text [SEP]` + regions with the 5-d location, the same truncation), or an
evaluation would measure a layout mismatch instead of the model. Batches are therefore built with
pre-training's own `raysys.pretrain.granularities.assemble`.

`base` is the paper's "Base" row: the default backbone (MiniLM unless `model_path` says otherwise)
with fresh heads drawn from a fixed seed, never pre-trained on V+L data.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raysys import tracking
from raysys.checkpoints import load_payload
from raysys.contract import ContractError, read_manifest, shard_files
from raysys.pretrain.granularities import Corpus, Sample, assemble, read_image_parts
from raysys.pretrain.model import ModelConfig, build_model, load_checkpoint
from raysys.pretrain.objectives import IGNORE

log = logging.getLogger(__name__)

BASE = "base"
DEFAULT_MAX_TEXT_LEN = 40
DEFAULT_MAX_REGIONS = 36


# ---------------------------------------------------------------- the model under evaluation


@dataclass
class ModelSource:
    """A picklable recipe for the model, so a Ray worker can rebuild it instead of receiving it.

    `checkpoint` is a `raysys pretrain` model.pt path or "base". The other fields only matter for
    `base` (a checkpoint stores its own shapes).
    """

    checkpoint: str
    feature_dim: int = 2048
    num_classes: int = 80
    model_path: str = ""
    num_layers: int = 0
    seed: int = 0

    @property
    def is_base(self) -> bool:
        return self.checkpoint == BASE


def load_model(src: ModelSource):
    """(model in eval mode, checkpoint extra dict). `base` is rebuilt identically from its seed."""
    if src.is_base:
        cfg = ModelConfig(model_path=src.model_path, num_layers=src.num_layers, feature_dim=src.feature_dim,
                          num_classes=max(1, src.num_classes))  # fmt: skip
        model = build_model(cfg, pretrained=True, seed=src.seed)
        extra: dict[str, Any] = {"recipe": BASE, "seed": src.seed}
    else:
        path = Path(src.checkpoint)
        if not path.is_file():
            raise ContractError(path, None, "checkpoint", "no such file (give a model.pt path or 'base')")
        model, extra = load_checkpoint(path)
    return model.eval(), extra


MODEL_FILE = "model.pt"


@contextmanager
def local_checkpoint(spec: str | Path) -> Iterator[str]:
    """A local model.pt for `spec`: "base", a model.pt, a checkpoint directory holding model.pt
    (`raysys pretrain --out`, a Ray Train checkpoint), or a checkpoint URI (s3://…, gs://…; fetched
    through Ray Train's `Checkpoint.as_directory`)."""
    s = str(spec)
    if s == BASE:
        yield BASE
        return
    if "://" in s and not s.startswith("file://"):
        from ray.train import Checkpoint  # lazy: ray.train takes seconds to import; only URIs need it

        with Checkpoint(s).as_directory() as d:
            yield str(Path(d) / MODEL_FILE)
        return
    p = Path(s.removeprefix("file://"))
    yield str(p / MODEL_FILE if p.is_dir() else p)


def checkpoint_extra(checkpoint: str) -> dict[str, Any]:
    """The `extra` dict stored in a checkpoint (recipe, steps, pretrain_config, MLflow run ids…),
    without building the model; {} for base."""
    if checkpoint == BASE:
        return {}
    payload = load_payload(checkpoint)  # weights-only; a tampered file is one ContractError
    return json.loads(payload.get("extra", "{}") or "{}")


def text_settings(extra: dict[str, Any], max_text_len: int = 0, max_regions: int = 0) -> tuple[int, int]:
    """Text length and region cap: explicit values win, else the checkpoint's pre-training ones."""
    pre = extra.get("pretrain_config") or {}
    return (
        max_text_len or int(pre.get("max_text_len") or DEFAULT_MAX_TEXT_LEN),
        max_regions or int(pre.get("max_regions") or DEFAULT_MAX_REGIONS),
    )


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- images


def _canonical_keys(image_id: str) -> list[str]:
    """Ways one image is named across formats: `COCO_val2014_000000262148.jpg`, its stem, and the
    bare number 262148 (VQA/RefCOCO use integer ids; Flickr8k gold uses stems, featurize keeps
    the extension). The exact id always comes first."""
    keys = [image_id]
    stem = Path(image_id).name
    stem = re.sub(r"\.(jpe?g|png|gif|bmp|webp|tiff?)$", "", stem, flags=re.I)
    if stem not in keys:
        keys.append(stem)
    m = re.search(r"(\d+)$", stem)
    if m and str(int(m.group(1))) not in keys:
        keys.append(str(int(m.group(1))))
    return keys


class ImageIndex:
    """Resolve an image reference from a task file to an `image_id` of a dataset's images table."""

    def __init__(self, image_ids: list[str]):
        self.ids = list(image_ids)
        self.exact = set(self.ids)
        self.by_key: dict[str, list[str]] = {}
        for iid in self.ids:
            for k in _canonical_keys(iid)[1:]:
                self.by_key.setdefault(k, []).append(iid)

    def resolve(self, ref: str | int, prefer: list[str] | None = None) -> str | None:
        """Exact id first, then each of `prefer` (format-specific spellings), then stem / number."""
        ref = str(ref)
        for cand in [ref, *(prefer or [])]:
            if cand in self.exact:
                return cand
        for cand in [ref, *(prefer or [])]:
            for k in _canonical_keys(cand):
                hits = self.by_key.get(k, [])
                if len(hits) == 1:
                    return hits[0]
        return None


def image_ids(root: str | Path) -> list[str]:
    files = shard_files(root, "images")
    if not files:
        raise ContractError(Path(root) / "images", None, "images", "table is missing or empty (featurize or import first)")
    return [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]


@dataclass
class ImageSet(Corpus):
    """Pre-training's `Corpus` (what `assemble` reads) plus the raw boxes and image sizes that
    referring expressions need. Only the image fields are filled."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (n_regions, 4) xyxy px
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image

    def image_boxes(self, i: int) -> np.ndarray:
        return self.boxes[self.regions(i)]


def load_images(root: str | Path, ids: list[str] | None = None, max_regions: int = DEFAULT_MAX_REGIONS) -> ImageSet:
    """The images `ids` (all when None, sorted) of a dataset directory, in that order.

    Regions beyond `max_regions` are dropped, as in pre-training.
    """
    root = Path(root)
    man = read_manifest(root)
    parts, read_dim = read_image_parts(root, None if ids is None else set(ids), max_regions)
    dim = read_dim if read_dim is not None else int(man.get("feature_dim") or 0)
    order = list(ids) if ids is not None else sorted(parts)
    missing = [i for i in order if i not in parts]
    if missing:
        raise ContractError(root / "images", None, "image_id", f"{len(missing)} image(s) not found, e.g. {missing[0]!r}")
    counts = np.array([len(parts[i]["class_ids"]) for i in order], dtype=np.int64)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    def cat(key: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([parts[i][key] for i in order]) if order else empty

    return ImageSet(
        feature_dim=dim,
        num_classes=max(1, len(man.get("tag_vocab") or [])),
        image_ids=order,
        offsets=offsets,
        features=cat("features", np.zeros((0, dim), np.float16)),
        loc=cat("loc", np.zeros((0, 5), np.float32)),
        class_ids=cat("class_ids", np.zeros(0, np.int64)),
        tags=[t for i in order for t in parts[i]["tags"]],
        boxes=cat("boxes", np.zeros((0, 4), np.float32)),
        sizes=[parts[i]["size"] for i in order],
    )


def check_feature_dim(corpus, model, where: str | Path) -> None:
    if corpus.feature_dim != model.cfg.feature_dim:
        raise ContractError(
            where, None, "features",
            f"feature dim {corpus.feature_dim}, but the model expects {model.cfg.feature_dim} "
            "(featurize/import the images with the backbone the checkpoint was pre-trained on)",
        )  # fmt: skip


# ---------------------------------------------------------------- batches


def tokenize(tokenizer, texts: list[str], max_text_len: int) -> list[np.ndarray]:
    """Token ids without [CLS]/[SEP] (`assemble` adds them), truncated like pre-training."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max(1, max_text_len - 2))
    return [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]


def pair_batch(corpus, tokenizer, token_ids: list[np.ndarray], images: list[int | None]) -> dict[str, Any]:
    """One encoder batch of (text, image) pairs: `images[b]` indexes `corpus` (None = text only)."""
    samples = [Sample(ids, np.full(len(ids), IGNORE, np.int64), image=img) for ids, img in zip(token_ids, images)]
    batch = assemble(samples, corpus, tokenizer)
    batch["objectives"] = ()
    return batch


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def score_pairs(model, corpus, tokenizer, tokens: list[np.ndarray], pair_img: np.ndarray, pair_txt: np.ndarray,
                batch_size: int, device, on_batch: Callable[[int], Any] | None = None) -> np.ndarray:  # fmt: skip
    """ITM match score (logit 1 − logit 0) of each (image, text) pair, in input order.

    Pairs are sorted by text length inside the call so batches carry little padding. `on_batch(n)`
    after each batch of n pairs (a progress bar)."""
    out = np.empty(len(pair_img), np.float32)
    lengths = np.array([len(tokens[t]) for t in pair_txt], np.int64) if len(pair_txt) else np.zeros(0, np.int64)
    order = np.argsort(lengths, kind="stable")
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = pair_batch(corpus, tokenizer, [tokens[int(pair_txt[i])] for i in idx], [int(pair_img[i]) for i in idx])
            logits = model(to_device(batch, device))["itm_logits"].float()
            out[idx] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))
    return out


# ---------------------------------------------------------------- MLflow


def parent_run_id(explicit: str = "", extra: dict[str, Any] | None = None, uri: str = "", checkpoint: str = "") -> str:
    """The MLflow run that produced the checkpoint: explicit, else recorded in the checkpoint, else
    the run of store `uri` whose `raysys.checkpoint` tag (set by pre-training, local and Ray Train)
    names the checkpoint's directory. "" when none is known."""
    if explicit:
        return explicit
    extra = extra or {}
    for k in ("mlflow_run_id", "run_id"):
        if extra.get(k):
            return str(extra[k])
    if uri and checkpoint and checkpoint != BASE:
        try:
            c = tracking.client(uri)
            where = checkpoint if "://" in checkpoint else str(Path(checkpoint).resolve())
            where = where.removesuffix("/" + MODEL_FILE)
            q = "tags.`raysys.checkpoint` = '" + where.replace("'", "''") + "'"
            exps = [e.experiment_id for e in c.search_experiments()]
            runs = c.search_runs(exps, filter_string=q, max_results=1) if exps else []
            if runs:
                return runs[0].info.run_id
        except Exception as e:  # a store we cannot read must not stop an evaluation
            log.debug("no parent run lookup in %s: %s", tracking.redact(uri), e)
    return ""


def numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a result dict into MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and np.isfinite(v):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(numeric(v, key + "."))
    return out


def log_mlflow(
    uri: str,
    *,
    metrics: dict[str, float],
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    parent: str = "",
    experiment: str = "raysys",
    run_name: str = "",
    artifacts: list[Path] | None = None,
    artifact_path: str = "evaluation",
    history: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    """One evaluation = one NEW, FINISHED MLflow run, a child of the pre-training run `parent`
    (tags `mlflow.parentRunId`, which nests it in the MLflow UI, and `raysys.parent_run_id`) in
    the parent's experiment. Why never the parent itself: the parent's tags (`raysys.stage`) and
    params describe the pre-training, and a second evaluation with other settings would leave
    metrics beside params they did not come from. A parent that is not in this store (the
    checkpoint was recorded elsewhere) is named in a warning; the run is then not nested.
    `history` rows (`step` + numbers) become per-step metrics. Returns the run's ids."""
    c = tracking.client(uri)
    exp_id = None
    if parent:
        try:
            exp_id = c.get_run(parent).info.experiment_id
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception for a missing run
            log.warning("MLflow: parent run %s is not in %s (%s): the evaluation run is not nested under it",
                        parent, tracking.redact(uri), str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip
            parent = ""
    if exp_id is None:
        root = tracking.sqlite_dir(uri)
        exp_id = tracking.ensure_experiment(c, experiment, (root / "mlartifacts").as_uri() if root else None)
    run_tags = {**tracking.source_tags(), **(tags or {})}
    if parent:
        run_tags.update({"raysys.parent_run_id": parent, "mlflow.parentRunId": parent})
    rid = c.create_run(exp_id, run_name=run_name or None, tags=run_tags).info.run_id
    try:
        tracking.log_params(uri, rid, tracking.flatten_params(params or {}))
        with tracking.MetricBuffer(uri, rid) as buf:
            buf.add(metrics, 0)
            for h in history or []:
                buf.add({k: v for k, v in h.items() if k != "step"}, int(h["step"]))
        tracking.log_artifacts(uri, rid, artifacts or [], artifact_path)
    except BaseException:
        tracking.end_run(uri, rid, "FAILED")
        raise
    tracking.end_run(uri, rid, "FINISHED")
    return {"tracking_uri": tracking.redact(uri), "run_id": rid, "parent_run_id": parent}
