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
import logging
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

log = logging.getLogger(__name__)

IMAGES_PER_SHARD = 2048
TEXTS_PER_SHARD = 100_000
TEXT_FORMATS = ("lines", "tsv", "coco-json", "flickr8k")
PAIRED_FORMATS = ("coco-json", "flickr8k")
MAX_TEXT_CHARS = 10_000  # longer "texts" are a whole document or a broken line join: counted and skipped
MAX_LABELMAP_INDEX = 1_000_000  # a detector's classes; a larger index is a broken file, not a vocabulary
FLOAT16_MAX = float(np.finfo(np.float16).max)  # features are float16 on disk


def check_id(raw: bytes | str, file: Path, row: int, field: str) -> str:
    """An image or text id: UTF-8, not blank, no NUL or other control characters (they break
    joins, file names and every tool that prints them)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ContractError(file, row, field, f"id is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(raw, str) or not raw.strip():
        raise ContractError(file, row, field, "empty id")
    bad = next((c for c in raw if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ContractError(file, row, field, f"id contains the control character {bad!r}")
    return raw


class UniqueIds:
    """Refuse a second row with an id seen before, naming both rows."""

    def __init__(self, field: str):
        self.field, self.seen = field, {}

    def add(self, key: str, file: Path, row: int) -> None:
        first = self.seen.setdefault(key, (file, row))
        if first != (file, row):
            where = f"row {first[1]}" if first[0] == file else f"{first[0]} row {first[1]}"
            raise ContractError(file, row, self.field, f"duplicate id {key!r} (first at {where})")


def check_features(feats: np.ndarray, file: Path, row: int) -> None:
    """Finite, and small enough for the float16 the images table stores."""
    if not np.isfinite(feats).all():
        raise ContractError(file, row, "features", "NaN or inf in region features")
    peak = float(np.abs(feats).max()) if feats.size else 0.0
    if peak > FLOAT16_MAX:
        raise ContractError(file, row, "features", f"value {peak:.6g} overflows float16 (largest {FLOAT16_MAX:g}); "
                            "scale the features before importing")  # fmt: skip


def _read_utf8(path: Path, field: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContractError(path, None, field, f"not valid UTF-8 (byte {e.start})") from None


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
    vocab = [line.strip().split(",")[0] for line in _read_utf8(Path(path), "vocab").splitlines() if line.strip()]
    if not vocab:
        raise ContractError(path, None, "vocab", "empty vocabulary")
    return vocab


LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")  # fmt: skip


def iter_lxmert_tsv(path: str | os.PathLike, vocab: list[str], dim: int = 2048) -> Iterator[ImageRecord]:
    path = Path(path)
    seen = UniqueIds("img_id")
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
            rec["img_id"] = check_id(parts[0], path, row, "img_id")
            seen.add(rec["img_id"], path, row)
            try:
                h, w, n = int(rec["img_h"]), int(rec["img_w"]), int(rec["num_boxes"])
            except ValueError:
                raise ContractError(path, row, "num_boxes", "img_h, img_w and num_boxes must be integers") from None
            if n < 1:
                raise ContractError(path, row, "num_boxes", "image has no regions")
            if h < 1 or w < 1:
                raise ContractError(path, row, "img_h" if h < 1 else "img_w", f"image size {w}x{h} is not positive")
            ids = _b64(rec["objects_id"], np.int64, n, path, row, "objects_id", f"{n} int64")
            conf = _b64(rec["objects_conf"], np.float32, n, path, row, "objects_conf", f"{n} float32")
            boxes = _b64(rec["boxes"], np.float32, n * 4, path, row, "boxes", f"{n}x4 float32").reshape(n, 4)
            feats = _b64(rec["features"], np.float32, n * dim, path, row, "features", f"{n}x{dim} float32")
            feats = feats.reshape(n, dim)
            check_features(feats, path, row)
            if ids.min() < 0 or ids.max() >= len(vocab):
                raise ContractError(path, row, "objects_id", f"class id {int(ids.max())} outside the {len(vocab)}-class vocabulary")
            yield ImageRecord(rec["img_id"], w, h, boxes, feats, [vocab[i] for i in ids], conf, ids.astype(np.int32), str(path))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _vinvl_labels(path: Path) -> Iterator[tuple[int, str, dict]]:
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ContractError(path, row, "labels", f"not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            key, _, payload = line.rstrip("\r\n").partition("\t")
            try:
                obj = json.loads(payload)
            except json.JSONDecodeError:
                raise ContractError(path, row, "labels", "not valid JSON") from None
            if isinstance(obj, list):
                obj = {"objects": obj}
            if not isinstance(obj, dict):
                raise ContractError(path, row, "labels", f"expected a list of objects or a mapping, got {type(obj).__name__}")
            yield row, key, obj


def _vinvl_objects(lab: dict, n: int, labels: Path, lrow: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(boxes, class names, confidences) of one label row, each value's type checked."""
    objs = lab.get("objects", [])
    if not isinstance(objs, list):
        raise ContractError(labels, lrow, "objects", f"expected a list, got {type(objs).__name__}")
    if len(objs) != n:
        raise ContractError(labels, lrow, "objects", f"{len(objs)} objects, feature row has {n} boxes")
    boxes, tags, conf = [], [], []
    for j, o in enumerate(objs):
        if not isinstance(o, dict):
            raise ContractError(labels, lrow, "objects", f"object {j} is a {type(o).__name__}, not a mapping")
        rect = o.get("rect")
        if not (isinstance(rect, list) and len(rect) == 4 and all(_is_number(v) for v in rect)):
            raise ContractError(labels, lrow, "rect", f"object {j}: expected [x1, y1, x2, y2] numbers, got {rect!r}")
        name = o.get("class")
        if not isinstance(name, str) or not name.strip():
            raise ContractError(labels, lrow, "class", f"object {j}: expected a class name, got {name!r}")
        c = o.get("conf", 1.0)
        if not _is_number(c):
            raise ContractError(labels, lrow, "conf", f"object {j}: expected a number, got {c!r}")
        boxes.append(rect)
        tags.append(name)
        conf.append(c)
    return np.array(boxes, np.float32).reshape(n, 4), tags, np.array(conf, np.float32)


def _vinvl_size(lab: dict, boxes: np.ndarray, normbox: np.ndarray, labels: Path, lrow: int) -> tuple[int, int]:
    """Image size from the label row, else from VinVL's normalised box (x2/W, y2/H)."""
    if "image_w" in lab and "image_h" in lab:
        for name in ("image_w", "image_h"):
            v = lab[name]
            if not _is_number(v) or v != int(v) or v < 1:
                raise ContractError(labels, lrow, name, f"expected a positive integer, got {v!r}")
        return int(lab["image_w"]), int(lab["image_h"])
    w = int(round(float(np.median(boxes[:, 2] / np.maximum(normbox[:, 2], 1e-6)))))
    h = int(round(float(np.median(boxes[:, 3] / np.maximum(normbox[:, 3], 1e-6)))))
    return w, h


def _vinvl_feature_row(parts: list[bytes], features: Path, row: int, dim: int) -> tuple[str, int, np.ndarray]:
    """(image key, number of boxes, features + normalised boxes (n, dim + 6)) of one feature row."""
    text = [p.decode("ascii", "replace") for p in parts]
    if len(parts) == 2 and text[1].lstrip().startswith("{"):
        try:
            d = json.loads(text[1])
            n, b64 = int(d["num_boxes"]), d["features"]
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            raise ContractError(features, row, "features", "expected JSON with num_boxes and features") from None
        if not isinstance(b64, str):
            raise ContractError(features, row, "features", f"expected a base64 string, got {type(b64).__name__}")
    elif len(parts) == 3:
        b64 = text[2]
        try:
            n = int(text[1])
        except ValueError:
            raise ContractError(features, row, "num_boxes", "not an integer") from None
    else:
        raise ContractError(features, row, "features", f"truncated row: {len(parts)} tab-separated fields")
    if n < 1:
        raise ContractError(features, row, "num_boxes", f"{n}: an image needs at least one region")
    key = check_id(parts[0], features, row, "image_key")
    full = _b64(b64, np.float32, n * (dim + 6), features, row, "features", f"{n}x({dim}+6) float32")
    return key, n, full.reshape(n, dim + 6)


def iter_vinvl_tsv(
    features: str | os.PathLike, labels: str | os.PathLike, labelmap: dict[str, int] | None = None, dim: int = 2048
) -> Iterator[ImageRecord]:
    """Rows of the two files are matched by image key and must come in the same order (as VinVL writes them)."""
    features, labels = Path(features), Path(labels)
    open(labels, "rb").close()  # a missing or unreadable labels file fails first, naming itself
    label_rows = _vinvl_labels(labels)
    seen = UniqueIds("image_key")
    with open(features, "rb") as f:
        for row, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            key, n, full = _vinvl_feature_row(line.split(b"\t"), features, row, dim)
            seen.add(key, features, row)
            feats, normbox = full[:, :dim], full[:, dim:]
            check_features(feats, features, row)
            try:
                lrow, lkey, lab = next(label_rows)
            except StopIteration:
                raise ContractError(labels, None, "image_key", f"no label row for image {key!r}") from None
            if lkey != key:
                raise ContractError(labels, lrow, "image_key", f"{lkey!r} does not match feature row {row} ({key!r})")
            boxes, tags, conf = _vinvl_objects(lab, n, labels, lrow)
            w, h = _vinvl_size(lab, boxes, normbox, labels, lrow)
            if labelmap is not None:
                unknown = [t for t in tags if t not in labelmap]
                if unknown:
                    raise ContractError(labels, lrow, "class", f"{unknown[0]!r} is not in the label map")
                cids = np.array([labelmap[t] for t in tags], np.int32)
            else:
                cids = np.full(n, -1, np.int32)
            yield ImageRecord(key, w, h, boxes, feats, tags, conf, cids, str(features))


def read_labelmap(path: str | os.PathLike) -> dict[str, int]:
    """A VinVL label map JSON (`{"label_to_idx": {name: index}}` or the mapping itself): every
    index a distinct non-negative integer."""
    path = Path(path)
    try:
        lm = json.loads(_read_utf8(path, "labelmap"))
    except json.JSONDecodeError as e:
        raise ContractError(path, e.lineno, "labelmap", f"not valid JSON: {e.msg}") from None
    field = "labelmap"
    if isinstance(lm, dict) and "label_to_idx" in lm:
        lm, field = lm["label_to_idx"], "label_to_idx"
    if not isinstance(lm, dict) or not lm:
        raise ContractError(path, None, field, "expected a non-empty mapping of class name to index")
    out: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name, v in lm.items():
        if not _is_number(v) or v != int(v) or not 0 <= v < MAX_LABELMAP_INDEX:
            raise ContractError(path, None, field, f"class {name!r}: index {v!r} is not an integer in 0..{MAX_LABELMAP_INDEX - 1}")
        if int(v) in owner:
            raise ContractError(path, None, field, f"class {name!r}: index {int(v)} is also {owner[int(v)]!r}'s")
        owner[int(v)] = name
        out[name] = int(v)
    return out


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
        labelmap = read_labelmap(labelmap_file)
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
            for line in _read_utf8(split_file, "split").splitlines()[1:]:
                if "\t" in line:
                    img, sp = line.split("\t", 1)
                    splits[img] = sp.strip()
        for row, raw in _lines(path):
            if row == 1 and raw.startswith(b"image\t"):
                continue
            cells = raw.split(b"\t")
            if len(cells) != 3:
                raise ContractError(path, row, "caption", f"expected 3 columns (image, caption_index, caption), got {len(cells)}")
            img = check_id(cells[0], path, row, "image")
            # the image column as written (`1000268201_693b08cb0e.jpg`): featurize's image_id of that photo
            yield row, check_text(cells[2], path, row, "caption"), img, splits.get(img)
    elif fmt == "coco-json":
        yield from _coco_json(path, max_captions)
    else:
        raise ContractError(path, None, "format", f"unknown text format {fmt!r}; one of {TEXT_FORMATS}")


def _coco_json(path: Path, max_captions: int) -> Iterator[tuple[int, str, str | None, str | None]]:
    """COCO/Karpathy captions: a list of {image_name, captions: [str], split} or `dataset_coco.json`
    ({images: [{filename, split, sentences: [{raw}]}]}); every value's JSON type is checked."""
    try:
        entries = json.loads(path.read_bytes())
    except UnicodeDecodeError as e:
        raise ContractError(path, None, "captions", f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ContractError(path, e.lineno, "json", f"not valid JSON: {e.msg}") from None
    if isinstance(entries, dict) and "images" in entries:  # COCO/Karpathy `dataset_coco.json`
        if not isinstance(entries["images"], list):
            raise ContractError(path, None, "images", f"expected a list, got {type(entries['images']).__name__}")
        entries = [_karpathy_entry(path, row, im) for row, im in enumerate(entries["images"], start=1)]
    if not isinstance(entries, list):
        raise ContractError(path, None, "json", "expected a list of {image_name, captions} entries")
    for row, e in enumerate(entries, start=1):
        if not isinstance(e, dict) or "captions" not in e or "image_name" not in e:
            raise ContractError(path, row, "captions", "entry needs image_name and captions")
        name, caps, split = e["image_name"], e["captions"], e.get("split")
        if not isinstance(name, str):
            raise ContractError(path, row, "image_name", f"expected a string, got {_json_type(name)}")
        image_id = check_id(Path(name).stem, path, row, "image_name")
        if not isinstance(caps, list):
            raise ContractError(path, row, "captions", f"expected a list of strings, got {_json_type(caps)}")
        if split is not None and not isinstance(split, str):
            raise ContractError(path, row, "split", f"expected a string, got {_json_type(split)}")
        for j, cap in enumerate(caps if not max_captions else caps[:max_captions]):
            if not isinstance(cap, str):
                raise ContractError(path, row, "captions", f"caption {j} is {_json_type(cap)}, expected a string")
            yield row, check_text(cap, path, row, "captions"), image_id, split


def _json_type(v: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)  # fmt: skip


def _karpathy_entry(path: Path, row: int, im: object) -> dict:
    if not isinstance(im, dict) or not isinstance(im.get("sentences", []), list):
        raise ContractError(path, row, "sentences", "expected an image object with a list of sentences")
    caps = [s.get("raw") if isinstance(s, dict) else s for s in im.get("sentences", [])]
    return {"image_name": im.get("filename"), "split": im.get("split"), "captions": caps}


def import_texts(files: list[str | os.PathLike], fmt: str, out: str | os.PathLike, column: int = 0,
                 header: bool = False, source: str | None = None, max_captions: int = 5,
                 max_text_chars: int = MAX_TEXT_CHARS, strict: bool = False) -> dict:  # fmt: skip
    """Write the texts table (and `gold/` where the format has true pairs) of a dataset dir.

    Text ids are `SOURCE/NNNNNNNN`, numbered per source across the files, so two files with the
    same stem (or one `source`) get distinct ids. A text longer than `max_text_chars` (0: no limit)
    is counted and skipped, or with `strict` fails the import naming its row."""
    n_texts = n_gold = n_long = 0
    next_index: dict[str, int] = {}
    with ExitStack() as stack:
        root = stack.enter_context(atomic_dataset_dir(out))
        texts = ShardWriter(stack.enter_context(atomic_table_dir(root, "texts")), TEXTS_SCHEMA, TEXTS_PER_SHARD)
        # Only formats with true pairs touch gold/: importing plain sentences keeps an existing gold table.
        gold = ShardWriter(stack.enter_context(atomic_table_dir(root, "gold")), GOLD_SCHEMA, TEXTS_PER_SHARD) \
            if fmt in PAIRED_FORMATS else None
        for path in map(Path, files):
            src = source or path.stem
            ids, txt, g_img, g_txt, g_split = [], [], [], [], []
            for row, text, img, split in iter_texts(path, fmt, column, header, max_captions):
                i = next_index[src] = next_index.get(src, -1) + 1
                if max_text_chars and len(text) > max_text_chars:
                    if strict:
                        raise ContractError(path, row, "text", f"{len(text)} characters, over max_text_chars={max_text_chars}")
                    n_long += 1
                    continue
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
            raise ContractError(files[0] if files else "texts", None, "text", "no texts in input"
                                + (f" ({n_long} over max_text_chars={max_text_chars})" if n_long else ""))  # fmt: skip
        counts = {"texts": n_texts}
        if n_gold:
            counts["gold"] = n_gold
        prov = {"source": [str(f) for f in files], "format": fmt}
        if n_long:
            prov["skipped_over_max_text_chars"] = n_long
            log.warning("import texts: skipped %d texts longer than max_text_chars=%d", n_long, max_text_chars)
        man = update_manifest(root, "import", counts=counts, provenance=prov)
    return {**man, "skipped": {"over_max_text_chars": n_long}} if n_long else man
