"""Importers: standard detector-feature and caption formats → the data contract.

All importers stream (a line or JSON entry at a time into fixed-size shards), so inputs larger
than RAM work, and all stop at the first bad row with a one-line `ContractError` naming the file,
the 1-based row (line number for line formats, entry number for JSON) and the field. Output goes
through `atomic_dataset_dir` / `atomic_table_dir`: a failed import leaves nothing half-written.

Formats:
- LXMERT / bottom-up-attention "obj36" TSV (no header; 10 fields; arrays base64 of int64 ids and
  float32 confs, boxes (N,4) xyxy pixels, features (N,D)) with a Visual Genome object vocabulary.
- VinVL: a feature TSV (`id \\t num_boxes \\t base64(float32 N×(D+6))` or
  `id \\t {"num_boxes":…, "features": base64}`) plus a label TSV (`id \\t [{"rect":[x1,y1,x2,y2],
  "class":…, "conf":…}, …]` or `{"objects": […], "image_h":…, "image_w":…}`). The 6 trailing
  feature dims are VinVL's normalised box; they give the image size when the labels do not.
- Texts: plain lines, a TSV column, COCO/Karpathy caption JSON, Flickr8k `captions.tsv`. The last
  two carry true pairs, written to `gold/`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysys.contract import (
    GOLD_SCHEMA,
    TEXTS_SCHEMA,
    ContractError,
    ImageRecord,
    ShardWriter,
    atomic_dataset_dir,
    atomic_table_dir,
    check_text,
    images_table,
    update_manifest,
    validate_images,
)

IMAGES_PER_SHARD = 2048
TEXTS_PER_SHARD = 100_000
TEXT_FORMATS = ("lines", "tsv", "coco-json", "flickr8k")
PAIRED_FORMATS = ("coco-json", "flickr8k")


def _b64(value: str, dtype: np.dtype, count: int, file: Path, row: int, field: str, shape: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(file, row, field, "not valid base64") from None
    want = count * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise ContractError(file, row, field, f"base64 decodes to {len(raw)} bytes, expected {shape} = {want}")
    return np.frombuffer(raw, dtype=dtype)


def read_vocab(path: str | os.PathLike) -> list[str]:
    """A VG-style vocabulary file: one class per line; `a,b` synonyms keep the first name."""
    return [line.strip().split(",")[0] for line in Path(path).read_text().splitlines() if line.strip()]


LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")  # fmt: skip


def iter_lxmert_tsv(path: str | os.PathLike, vocab: list[str], dim: int = 2048) -> Iterator[ImageRecord]:
    path = Path(path)
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            parts = line.split(b"\t")
            if len(parts) != len(LXMERT_FIELDS):
                missing = LXMERT_FIELDS[len(parts)] if len(parts) < len(LXMERT_FIELDS) else "(extra)"
                raise ContractError(path, row, missing, f"truncated row: {len(parts)} of {len(LXMERT_FIELDS)} tab-separated fields")
            rec = dict(zip(LXMERT_FIELDS, (p.decode("ascii", "replace") for p in parts)))
            try:
                h, w, n = int(rec["img_h"]), int(rec["img_w"]), int(rec["num_boxes"])
            except ValueError:
                raise ContractError(path, row, "num_boxes", "img_h, img_w and num_boxes must be integers") from None
            if n < 1:
                raise ContractError(path, row, "num_boxes", "image has no regions")
            ids = _b64(rec["objects_id"], np.int64, n, path, row, "objects_id", f"{n} int64")
            conf = _b64(rec["objects_conf"], np.float32, n, path, row, "objects_conf", f"{n} float32")
            boxes = _b64(rec["boxes"], np.float32, n * 4, path, row, "boxes", f"{n}x4 float32").reshape(n, 4)
            feats = _b64(rec["features"], np.float32, n * dim, path, row, "features", f"{n}x{dim} float32")
            feats = feats.reshape(n, dim)
            if not np.isfinite(feats).all():
                raise ContractError(path, row, "features", "NaN or inf in region features")
            if ids.min() < 0 or ids.max() >= len(vocab):
                raise ContractError(path, row, "objects_id", f"class id {int(ids.max())} outside the {len(vocab)}-class vocabulary")
            yield ImageRecord(rec["img_id"], w, h, boxes, feats, [vocab[i] for i in ids], conf, ids.astype(np.int32), str(path))


def _vinvl_labels(path: Path) -> Iterator[tuple[int, str, dict]]:
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, _, payload = line.rstrip("\n").partition("\t")
            try:
                obj = json.loads(payload)
            except json.JSONDecodeError:
                raise ContractError(path, row, "labels", "not valid JSON") from None
            yield row, key, obj if isinstance(obj, dict) else {"objects": obj}


def iter_vinvl_tsv(
    features: str | os.PathLike, labels: str | os.PathLike, labelmap: dict[str, int] | None = None, dim: int = 2048
) -> Iterator[ImageRecord]:
    """Rows of the two files are matched by image key and must come in the same order (as VinVL writes them)."""
    features, labels = Path(features), Path(labels)
    label_rows = _vinvl_labels(labels)
    with open(features, "rb") as f:
        for row, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            parts = line.decode("ascii", "replace").split("\t")
            if len(parts) == 2 and parts[1].lstrip().startswith("{"):
                try:
                    d = json.loads(parts[1])
                    key, n, b64 = parts[0], int(d["num_boxes"]), d["features"]
                except (json.JSONDecodeError, KeyError, ValueError):
                    raise ContractError(features, row, "features", "expected JSON with num_boxes and features") from None
            elif len(parts) == 3:
                key, b64 = parts[0], parts[2]
                try:
                    n = int(parts[1])
                except ValueError:
                    raise ContractError(features, row, "num_boxes", "not an integer") from None
            else:
                raise ContractError(features, row, "features", f"truncated row: {len(parts)} tab-separated fields")
            full = _b64(b64, np.float32, n * (dim + 6), features, row, "features", f"{n}x({dim}+6) float32")
            full = full.reshape(n, dim + 6)
            feats, normbox = full[:, :dim], full[:, dim:]
            if not np.isfinite(feats).all():
                raise ContractError(features, row, "features", "NaN or inf in region features")
            try:
                lrow, lkey, lab = next(label_rows)
            except StopIteration:
                raise ContractError(labels, None, "image_key", f"no label row for image {key!r}") from None
            if lkey != key:
                raise ContractError(labels, lrow, "image_key", f"{lkey!r} does not match feature row {row} ({key!r})")
            objs = lab.get("objects", [])
            if len(objs) != n:
                raise ContractError(labels, lrow, "objects", f"{len(objs)} objects, feature row has {n} boxes")
            try:
                boxes = np.array([o["rect"] for o in objs], np.float32).reshape(n, 4)
                tags = [str(o["class"]) for o in objs]
                conf = np.array([o.get("conf", 1.0) for o in objs], np.float32)
            except (KeyError, TypeError, ValueError):
                raise ContractError(labels, lrow, "objects", "each object needs rect [x1,y1,x2,y2] and class") from None
            if "image_w" in lab and "image_h" in lab:
                w, h = int(lab["image_w"]), int(lab["image_h"])
            else:  # VinVL's normalised box: x2/W, y2/H
                w = int(round(float(np.median(boxes[:, 2] / np.maximum(normbox[:, 2], 1e-6)))))
                h = int(round(float(np.median(boxes[:, 3] / np.maximum(normbox[:, 3], 1e-6)))))
            if labelmap is not None:
                unknown = [t for t in tags if t not in labelmap]
                if unknown:
                    raise ContractError(labels, lrow, "class", f"{unknown[0]!r} is not in the label map")
                cids = np.array([labelmap[t] for t in tags], np.int32)
            else:
                cids = np.full(n, -1, np.int32)
            yield ImageRecord(key, w, h, boxes, feats, tags, conf, cids, str(features))


def write_images(records: Iterator[ImageRecord], out: str | os.PathLike, dim: int, tag_vocab: list[str],
                 source: str) -> dict:  # fmt: skip
    """Validate and write image records as shards of the images table; return the manifest."""
    n_images = n_regions = 0
    with atomic_dataset_dir(out) as root, atomic_table_dir(root, "images") as d:
        writer = ShardWriter(d, images_table([], dim).schema, IMAGES_PER_SHARD)
        batch: list[ImageRecord] = []

        def flush() -> None:
            t = images_table(batch, dim)
            validate_images(t, source, dim, n_images - len(batch) + 1)
            writer.write(t)
            batch.clear()

        for rec in records:
            batch.append(rec)
            n_images += 1
            n_regions += len(rec.boxes)
            if len(batch) >= 256:
                flush()
        if batch:
            flush()
        writer.flush()
        if n_images == 0:
            raise ContractError(source, None, "images", "no images in input")
        man = update_manifest(root, "import", feature_dim=dim, tag_vocab=tag_vocab,
                              counts={"images": n_images, "regions": n_regions},
                              provenance={"source": str(source)})  # fmt: skip
    return man


def import_lxmert_tsv(file: str | os.PathLike, vocab_file: str | os.PathLike, out: str | os.PathLike, dim: int = 2048) -> dict:
    vocab = read_vocab(vocab_file)
    return write_images(iter_lxmert_tsv(file, vocab, dim), out, dim, vocab, str(file))


def import_vinvl_tsv(features: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
                     labelmap_file: str | os.PathLike | None = None, dim: int = 2048) -> dict:  # fmt: skip
    vocab: list[str] = []
    labelmap = None
    if labelmap_file:
        lm = json.loads(Path(labelmap_file).read_text())
        labelmap = {k: int(v) for k, v in lm.get("label_to_idx", lm).items()}
        vocab = [""] * (max(labelmap.values()) + 1)
        for k, v in labelmap.items():
            vocab[v] = k
    return write_images(iter_vinvl_tsv(features, labels, labelmap, dim), out, dim, vocab, str(features))


# ---------------------------------------------------------------- texts


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            yield row, raw.rstrip(b"\r\n")


def iter_texts(path: str | os.PathLike, fmt: str, column: int = 0, header: bool = False, max_captions: int = 5
               ) -> Iterator[tuple[int, str, str | None, str | None]]:  # fmt: skip
    """Yield (row, text, image_id or None, split or None) from one file.

    `max_captions` (coco-json): captions kept per image, 5 by the Karpathy evaluation convention
    (a few COCO images have 6-7); 0 keeps all.
    """
    path = Path(path)
    if fmt == "lines":
        for row, raw in _lines(path):
            yield row, check_text(raw, path, row), None, None
    elif fmt == "tsv":
        for row, raw in _lines(path):
            if header and row == 1:
                continue
            cells = raw.split(b"\t")
            if column >= len(cells):
                raise ContractError(path, row, f"column {column}", f"row has only {len(cells)} columns")
            yield row, check_text(cells[column], path, row, f"column {column}"), None, None
    elif fmt == "flickr8k":
        splits = {}
        split_file = path.with_name("split.tsv")
        if split_file.exists():
            for line in split_file.read_text().splitlines()[1:]:
                if "\t" in line:
                    img, sp = line.split("\t", 1)
                    splits[img] = sp.strip()
        for row, raw in _lines(path):
            if row == 1 and raw.startswith(b"image\t"):
                continue
            cells = raw.split(b"\t")
            if len(cells) != 3:
                raise ContractError(path, row, "caption", f"expected 3 columns (image, caption_index, caption), got {len(cells)}")
            img = check_text(cells[0], path, row, "image")
            yield row, check_text(cells[2], path, row, "caption"), Path(img).stem, splits.get(img)
    elif fmt == "coco-json":
        try:
            entries = json.loads(path.read_bytes())
        except UnicodeDecodeError as e:
            raise ContractError(path, None, "captions", f"not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ContractError(path, e.lineno, "json", f"not valid JSON: {e.msg}") from None
        if isinstance(entries, dict) and "images" in entries:  # COCO/Karpathy `dataset_coco.json`
            entries = [{"image_name": im.get("filename"), "split": im.get("split"),
                        "captions": [s.get("raw") for s in im.get("sentences", [])]} for im in entries["images"]]  # fmt: skip
        if not isinstance(entries, list):
            raise ContractError(path, None, "json", "expected a list of {image_name, captions} entries")
        for row, e in enumerate(entries, start=1):
            if not isinstance(e, dict) or "captions" not in e or "image_name" not in e:
                raise ContractError(path, row, "captions", "entry needs image_name and captions")
            caps = e["captions"] if not max_captions else e["captions"][:max_captions]
            for cap in caps:
                yield row, check_text(cap, path, row, "captions"), Path(str(e["image_name"])).stem, e.get("split")
    else:
        raise ContractError(path, None, "format", f"unknown text format {fmt!r}; one of {TEXT_FORMATS}")


def import_texts(files: list[str | os.PathLike], fmt: str, out: str | os.PathLike, column: int = 0,
                 header: bool = False, source: str | None = None, max_captions: int = 5) -> dict:  # fmt: skip
    """Write the texts table (and `gold/` where the format has true pairs) of a dataset dir."""
    n_texts = n_gold = 0
    with ExitStack() as stack:
        root = stack.enter_context(atomic_dataset_dir(out))
        texts = ShardWriter(stack.enter_context(atomic_table_dir(root, "texts")), TEXTS_SCHEMA, TEXTS_PER_SHARD)
        # Only formats with true pairs touch gold/: importing plain sentences keeps an existing gold table.
        gold = ShardWriter(stack.enter_context(atomic_table_dir(root, "gold")), GOLD_SCHEMA, TEXTS_PER_SHARD) \
            if fmt in PAIRED_FORMATS else None
        for path in map(Path, files):
            src = source or path.stem
            ids, txt, g_img, g_txt, g_split = [], [], [], [], []
            for i, (_row, text, img, split) in enumerate(iter_texts(path, fmt, column, header, max_captions)):
                tid = f"{src}/{i:08d}"
                ids.append(tid)
                txt.append(text)
                if img is not None:
                    g_img.append(img)
                    g_txt.append(tid)
                    g_split.append(split or "")
                if len(ids) >= 50_000:
                    texts.write(pa.table({"text_id": ids, "text": txt, "source": [src] * len(ids)}, schema=TEXTS_SCHEMA))
                    n_texts += len(ids)
                    ids, txt = [], []
            if ids:
                texts.write(pa.table({"text_id": ids, "text": txt, "source": [src] * len(ids)}, schema=TEXTS_SCHEMA))
                n_texts += len(ids)
            if g_img and gold is not None:
                gold.write(pa.table({"image_id": g_img, "text_id": g_txt, "split": g_split}, schema=GOLD_SCHEMA))
                n_gold += len(g_img)
        texts.flush()
        if gold is not None:
            gold.flush()
        if n_texts == 0:
            raise ContractError(files[0] if files else "texts", None, "text", "no texts in input")
        counts = {"texts": n_texts}
        if n_gold:
            counts["gold"] = n_gold
        man = update_manifest(root, "import", counts=counts,
                              provenance={"source": [str(f) for f in files], "format": fmt})  # fmt: skip
    return man
