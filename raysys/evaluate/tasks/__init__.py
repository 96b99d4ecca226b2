"""Downstream tasks (paper 000 appendix C, 001 appendix A): the registry and the readers of their
official file formats.

A reader turns task files into `Example`s: which image(s), which text, which label. Images are
named as the file names them (a VQA integer id, an NLVR2 identifier, a Flickr30k id); they are
resolved against a dataset's `images/` table later (`raysys.evaluate.downstream.ImageIndex`), so one reader
works with images from `raysys featurize` and from an imported TSV alike.

| task | formats (`format=` / auto-detected) | label |
|---|---|---|
| `vqa` (VQA v2) | `official`: questions JSON (+ annotations JSON); `simple`: JSON(L) rows `{image, question, answers}` | the human answers (10) |
| `nlvr2` | `official`: JSONL (`identifier`, `sentence`, `label` "True"/"False"); `lxmert`: JSON list (`img0`, `img1`, `sent`, `label` 0/1) | 0/1 |
| `ve` (SNLI-VE) | `official`: JSONL (`Flickr30K_ID`, `sentence2`, `gold_label`); `simple`: `{image, hypothesis, label}` | entailment/neutral/contradiction |
| `refcoco` (RefCOCO+) | `refs`: refs(unc) as JSON (the pickle's list of refs) + COCO `instances.json`; `simple`: `{image, expression, box: [x1,y1,x2,y2]}` | the gold box, xyxy pixels |
| `retrieval` | `flickr30k`: Flickr30k Entities split file (ids) + `Sentences/`; `karpathy`: `dataset_*.json` or `[{image_name, captions}]`; `flickr8k`: `captions.tsv` (+ `split.tsv`); `simple`: `{image, caption}` | — |

Every malformed file fails with one `ContractError` line naming the file, the 1-based entry (line
number for JSONL/TSV) and the field.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysys.contract import ContractError

VE_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class Example:
    """One task example before images are resolved."""

    uid: str
    images: list[str]  # image references as the file names them (NLVR2: [left, right])
    text: str
    label: Any = None  # vqa: list of answers; nlvr2: 0/1; ve: 0/1/2; refcoco: [x1, y1, x2, y2]
    prefer: list[list[str]] = field(default_factory=list)  # other spellings of each image, tried first
    meta: dict[str, Any] = field(default_factory=dict)


Reader = Callable[[list[Path], str], list[Example]]


@dataclass
class TaskSpec:
    """A downstream task: how to read it and what it reports."""

    name: str
    headline: str  # the metric that enters the meta-average (percent)
    formats: dict[str, Reader]
    detect: Callable[[list[Path]], str]
    labels: tuple[str, ...] = ()
    images_per_example: int = 1


TASKS: dict[str, TaskSpec] = {}
ALIASES = {"vqav2": "vqa", "vqa2": "vqa", "snli-ve": "ve", "snli_ve": "ve", "visual_entailment": "ve",
           "refcoco+": "refcoco", "refcocoplus": "refcoco", "flickr30k": "retrieval", "itm": "retrieval"}  # fmt: skip


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    from raysys.config import ConfigError

    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"task: unknown {name!r}; known: {sorted(TASKS)} (aliases {sorted(ALIASES)})")
    return TASKS[key]


def read_task(task: str, files: list[str | os.PathLike], fmt: str = "auto", split: str = "") -> list[Example]:
    """Read task files with the named format (or the detected one); `split` keeps only examples of
    that split when the format carries splits (RefCOCO refs, Karpathy JSON, Flickr8k)."""
    from raysys.config import ConfigError

    spec = get_task(task)
    paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError(f"{spec.name}: no input files")
    for p in paths:
        if not p.exists():
            raise ContractError(p, None, "file", "no such file")
    fmt = spec.detect(paths) if fmt in ("", "auto") else fmt
    if fmt not in spec.formats:
        raise ConfigError(f"{spec.name}: unknown format {fmt!r}; known: {sorted(spec.formats)}")
    examples = spec.formats[fmt](paths, split)
    if not examples:
        raise ContractError(paths[0], None, "examples", f"no {spec.name} examples" + (f" in split {split!r}" if split else ""))
    return examples


# ---------------------------------------------------------------- file helpers


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ContractError(path, e.lineno, "json", f"not valid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ContractError(path, None, "encoding", f"not valid UTF-8 (byte {e.start})") from None


def _load_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ContractError(path, n, "json", f"not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ContractError(path, n, "json", f"expected an object per line, got {type(obj).__name__}")
                rows.append((n, obj))
    except UnicodeDecodeError as e:
        raise ContractError(path, None, "encoding", f"not valid UTF-8 (byte {e.start})") from None
    return rows


def _rows(path: Path) -> list[tuple[int, dict]]:
    """Entries of a JSON list or JSONL file, numbered from 1 (JSONL: line numbers)."""
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"["):
        data = _load_json(path)
        rows = []
        for n, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                raise ContractError(path, n, "json", f"expected an object, got {type(obj).__name__}")
            rows.append((n, obj))
        return rows
    return _load_jsonl(path)


def _get(obj: dict, keys: tuple[str, ...], path: Path, row: int, kind: type | tuple = str) -> Any:
    """The first of `keys` present in `obj`, type-checked; a one-line error names the first key."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in keys:
        if k in obj and obj[k] is not None:
            v = obj[k]
            if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
                want = "/".join(t.__name__ for t in kinds)
                raise ContractError(path, row, k, f"expected {want}, got {type(v).__name__} {str(v)[:40]!r}")
            if isinstance(v, str) and not v.strip():
                raise ContractError(path, row, k, "empty")
            return v
    raise ContractError(path, row, keys[0], "missing" + (f" (also looked for {', '.join(keys[1:])})" if len(keys) > 1 else ""))


def _peek(path: Path) -> Any:
    """The JSON document of a file, or the first row of a JSONL file; None for other text."""
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"["):
        return _load_json(path)
    if head.startswith(b"{"):
        try:
            return _load_json(path)
        except ContractError as err:
            try:
                rows = _load_jsonl(path)
            except ContractError:
                raise err from None
            return rows[0][1] if rows else {}
    return None


def _split_ok(value: Any, split: str) -> bool:
    return not split or str(value) == split


# ---------------------------------------------------------------- VQA v2


def read_vqa_official(files: list[Path], split: str = "") -> list[Example]:
    """VQA v2 `v2_OpenEnded_mscoco_*_questions.json` (+ `v2_mscoco_*_annotations.json`), any order.

    Without an annotations file the examples carry no answers (prediction only). Images are
    `COCO_<data_subtype>_<12-digit id>` (tried first) or the bare integer id."""
    qfile = afile = None
    for p in files:
        d = _load_json(p)
        if not isinstance(d, dict):
            raise ContractError(p, None, "json", "expected a JSON object with 'questions' or 'annotations'")
        if "questions" in d:
            qfile, qdata = p, d
        elif "annotations" in d:
            afile, adata = p, d
        else:
            raise ContractError(p, None, "questions", "neither 'questions' nor 'annotations' at the top level")
    if qfile is None:
        raise ContractError(files[0], None, "questions", "VQA needs the questions file (with a 'questions' list)")
    subtype = str(qdata.get("data_subtype") or "")
    answers: dict[int, tuple[list[str], dict]] = {}
    if afile is not None:
        if not isinstance(adata["annotations"], list):
            raise ContractError(afile, None, "annotations", "expected a list")
        for n, a in enumerate(adata["annotations"], start=1):
            if not isinstance(a, dict):
                raise ContractError(afile, n, "annotations", "expected an object")
            qid = _get(a, ("question_id",), afile, n, int)
            ans = _get(a, ("answers",), afile, n, list)
            if not ans:
                raise ContractError(afile, n, "answers", "empty list")
            texts = []
            for x in ans:
                if not isinstance(x, dict) or not isinstance(x.get("answer"), str):
                    raise ContractError(afile, n, "answers", "each answer must be an object with a string 'answer'")
                texts.append(x["answer"])
            meta = {k: a[k] for k in ("answer_type", "question_type", "multiple_choice_answer") if k in a}
            answers[qid] = (texts, meta)
    if not isinstance(qdata["questions"], list):
        raise ContractError(qfile, None, "questions", "expected a list")
    out = []
    for n, q in enumerate(qdata["questions"], start=1):
        if not isinstance(q, dict):
            raise ContractError(qfile, n, "questions", "expected an object")
        qid = _get(q, ("question_id",), qfile, n, int)
        img = _get(q, ("image_id",), qfile, n, int)
        text = _get(q, ("question",), qfile, n, str)
        if afile is not None and qid not in answers:
            raise ContractError(afile, None, "question_id", f"no annotation for question {qid} ({qfile.name} entry {n})")
        label, meta = answers.get(qid, (None, {}))
        prefer = [f"COCO_{subtype}_{img:012d}"] if subtype else []
        out.append(Example(str(qid), [str(img)], text, label, [prefer], {"question_id": qid, "image_id": img, **meta}))
    return out


def read_vqa_simple(files: list[Path], split: str = "") -> list[Example]:
    """JSON list / JSONL rows `{image, question, answers: [..]}` (`image_id`/`img_id`, `sent` accepted)."""
    out = []
    for p in files:
        for n, r in _rows(p):
            if not _split_ok(r.get("split", ""), split):
                continue
            img = _get(r, ("image", "image_id", "img_id"), p, n, (str, int))
            text = _get(r, ("question", "sent"), p, n, str)
            ans = r.get("answers")
            if ans is not None and (not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans)):
                raise ContractError(p, n, "answers", "expected a non-empty list of strings")
            uid = str(r.get("question_id", f"{p.stem}:{n}"))
            out.append(Example(uid, [str(img)], text, ans, [[]], {}))
    return out


def _detect_vqa(files: list[Path]) -> str:
    first = _peek(files[0])
    if isinstance(first, dict) and not ({"question", "sent"} & set(first)):
        return "official"  # a JSON document (questions / annotations), not a row of the simple layout
    return "simple"


register(TaskSpec("vqa", "vqa_accuracy", {"official": read_vqa_official, "simple": read_vqa_simple}, _detect_vqa))


# ---------------------------------------------------------------- NLVR2

_NLVR2_ID = re.compile(r"^(?P<pair>.+)-(?P<sent>\d+)$")


def _bool_label(v: Any, path: Path, row: int) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return int(v.strip().lower() == "true")
    raise ContractError(path, row, "label", f"{v!r} is not True/False (or 1/0)")


def read_nlvr2_official(files: list[Path], split: str = "") -> list[Example]:
    """The NLVR2 release's JSONL: `identifier` `split-set-pair-sentence` names the images
    `split-set-pair-img0` / `-img1` (left, right)."""
    out = []
    for p in files:
        for n, r in _load_jsonl(p):
            ident = _get(r, ("identifier",), p, n, str)
            m = _NLVR2_ID.match(ident)
            if not m:
                raise ContractError(p, n, "identifier", f"{ident!r} is not split-set-pair-sentence")
            text = _get(r, ("sentence",), p, n, str)
            label = _bool_label(_get(r, ("label",), p, n, (str, bool, int)), p, n)
            pair = m.group("pair")
            out.append(Example(ident, [f"{pair}-img0", f"{pair}-img1"], text, label, [[], []], {"identifier": ident}))
    return out


def read_nlvr2_lxmert(files: list[Path], split: str = "") -> list[Example]:
    """LXMERT/UNITER's processed NLVR2 JSON: `[{identifier, img0, img1, sent, label: 0/1}]`."""
    out = []
    for p in files:
        for n, r in _rows(p):
            img0 = _get(r, ("img0",), p, n, str)
            img1 = _get(r, ("img1",), p, n, str)
            text = _get(r, ("sent", "sentence"), p, n, str)
            label = _bool_label(_get(r, ("label",), p, n, (int, str, bool)), p, n)
            uid = str(r.get("identifier") or r.get("uid") or f"{p.stem}:{n}")
            out.append(Example(uid, [img0, img1], text, label, [[], []], {}))
    return out


def _detect_nlvr2(files: list[Path]) -> str:
    first = _peek(files[0])
    row = first[0] if isinstance(first, list) and first else first
    if isinstance(row, dict) and "img0" in row:
        return "lxmert"
    return "official"


register(TaskSpec("nlvr2", "accuracy", {"official": read_nlvr2_official, "lxmert": read_nlvr2_lxmert},
                  _detect_nlvr2, labels=("False", "True"), images_per_example=2))  # fmt: skip


# ---------------------------------------------------------------- SNLI-VE


def _ve_label(v: Any, path: Path, row: int) -> int:
    if isinstance(v, str) and v.strip().lower() in VE_LABELS:
        return VE_LABELS.index(v.strip().lower())
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 3:
        return v
    raise ContractError(path, row, "gold_label", f"{v!r} is not one of {list(VE_LABELS)}")


def read_ve_official(files: list[Path], split: str = "") -> list[Example]:
    """SNLI-VE JSONL (`snli_ve_{train,dev,test}.jsonl`): the premise is the Flickr30k image
    `Flickr30K_ID`, the hypothesis `sentence2`, the label `gold_label`."""
    out = []
    for p in files:
        for n, r in _load_jsonl(p):
            img = _get(r, ("Flickr30K_ID",), p, n, (str, int))
            text = _get(r, ("sentence2",), p, n, str)
            label = _ve_label(_get(r, ("gold_label",), p, n, str), p, n)
            uid = str(r.get("pairID") or f"{p.stem}:{n}")
            out.append(Example(uid, [str(img)], text, label, [[f"{img}.jpg"]], {}))
    return out


def read_ve_simple(files: list[Path], split: str = "") -> list[Example]:
    out = []
    for p in files:
        for n, r in _rows(p):
            img = _get(r, ("image", "image_id"), p, n, (str, int))
            text = _get(r, ("hypothesis", "sentence"), p, n, str)
            label = _ve_label(_get(r, ("label", "gold_label"), p, n, (str, int)), p, n)
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, label, [[]], {}))
    return out


def _detect_ve(files: list[Path]) -> str:
    first = _peek(files[0])
    row = first[0] if isinstance(first, list) and first else first
    return "official" if isinstance(row, dict) and "Flickr30K_ID" in row else "simple"


register(TaskSpec("ve", "accuracy", {"official": read_ve_official, "simple": read_ve_simple}, _detect_ve,
                  labels=VE_LABELS))  # fmt: skip


# ---------------------------------------------------------------- RefCOCO+


def _box(v: Any, path: Path, row: int, fieldname: str) -> list[float]:
    if not isinstance(v, list) or len(v) != 4 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ContractError(path, row, fieldname, f"expected 4 numbers, got {v!r:.60}")
    return [float(x) for x in v]


def read_refcoco_refs(files: list[Path], split: str = "") -> list[Example]:
    """The refs(unc) layout, as JSON (the list stored in `refs(unc).p`) + COCO `instances.json`.

    Each ref `{ref_id, ann_id, image_id, split, sentences: [{sent, sent_id}]}` gives one example
    per sentence; the gold box is the annotation `ann_id`'s `bbox` ([x, y, w, h] → xyxy)."""
    from raysys.evaluate.metrics import xywh_to_xyxy

    refs_file = inst_file = None
    for p in files:
        d = _load_json(p)
        if isinstance(d, list):
            refs_file, refs = p, d
        elif isinstance(d, dict) and "annotations" in d:
            inst_file, inst = p, d
        elif isinstance(d, dict) and "refs" in d:
            refs_file, refs = p, d["refs"]
        else:
            raise ContractError(p, None, "json", "neither a refs list nor a COCO instances file (with 'annotations')")
    if refs_file is None or inst_file is None:
        raise ContractError(files[0], None, "files", "the refs format needs two files: refs JSON + instances.json")
    boxes: dict[int, list[float]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for n, a in enumerate(inst["annotations"], start=1):
        if not isinstance(a, dict):
            raise ContractError(inst_file, n, "annotations", "expected an object")
        boxes[_get(a, ("id",), inst_file, n, int)] = xywh_to_xyxy(_box(a.get("bbox"), inst_file, n, "bbox"))
    for im in inst.get("images", []):
        if isinstance(im, dict) and "id" in im:
            sizes[im["id"]] = (im.get("width"), im.get("height"))
    out = []
    for n, r in enumerate(refs, start=1):
        if not isinstance(r, dict):
            raise ContractError(refs_file, n, "refs", "expected an object")
        if not _split_ok(r.get("split", ""), split):
            continue
        ann = _get(r, ("ann_id",), refs_file, n, int)
        img = _get(r, ("image_id",), refs_file, n, int)
        if ann not in boxes:
            raise ContractError(refs_file, n, "ann_id", f"annotation {ann} is not in {inst_file.name}")
        sents = _get(r, ("sentences",), refs_file, n, list)
        for s in sents:
            if not isinstance(s, dict) or not isinstance(s.get("sent"), str) or not s["sent"].strip():
                raise ContractError(refs_file, n, "sentences", "each sentence must be an object with a non-empty 'sent'")
            prefer = [str(r["file_name"])] if isinstance(r.get("file_name"), str) else []
            prefer += [f"COCO_train2014_{img:012d}"]
            uid = f"{r.get('ref_id', n)}:{s.get('sent_id', len(out))}"
            out.append(Example(uid, [str(img)], s["sent"], boxes[ann], [prefer],
                               {"ref_id": r.get("ref_id"), "split": r.get("split"), "image_size": sizes.get(img)}))  # fmt: skip
    return out


def read_refcoco_simple(files: list[Path], split: str = "") -> list[Example]:
    """JSON list / JSONL rows `{image, expression, box: [x1, y1, x2, y2]}` (pixels; `bbox_xywh`
    accepted instead of `box`)."""
    from raysys.evaluate.metrics import xywh_to_xyxy

    out = []
    for p in files:
        for n, r in _rows(p):
            if not _split_ok(r.get("split", ""), split):
                continue
            img = _get(r, ("image", "image_id"), p, n, (str, int))
            text = _get(r, ("expression", "sentence", "sent"), p, n, str)
            if "box" in r:
                box = _box(r["box"], p, n, "box")
                if box[2] < box[0] or box[3] < box[1]:
                    raise ContractError(p, n, "box", f"{box} is not x1 <= x2, y1 <= y2")
            elif "bbox_xywh" in r:
                box = xywh_to_xyxy(_box(r["bbox_xywh"], p, n, "bbox_xywh"))
            else:
                raise ContractError(p, n, "box", "missing (also looked for bbox_xywh)")
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, box, [[]], {}))
    return out


def _detect_refcoco(files: list[Path]) -> str:
    for p in files:
        first = _peek(p)
        row = first[0] if isinstance(first, list) and first else first
        if isinstance(row, dict) and ("annotations" in row or {"ann_id", "sentences"} <= set(row)):
            return "refs"
    return "simple"


register(TaskSpec("refcoco", "accuracy", {"refs": read_refcoco_refs, "simple": read_refcoco_simple}, _detect_refcoco))


# ---------------------------------------------------------------- retrieval (image–caption pairs)

_ENTITY = re.compile(r"\[/EN#\d+/[^\s\]]+\s+([^\]]*)\]")


def strip_entities(sentence: str) -> str:
    """Flickr30k Entities markup → plain text: `[/EN#1/people A girl] sits` → `A girl sits`."""
    return re.sub(r"\s+", " ", _ENTITY.sub(r"\1", sentence)).strip()


def read_retrieval_flickr30k(files: list[Path], split: str = "") -> list[Example]:
    """Flickr30k Entities: a split file of image ids (`train.txt`, `test.txt`, …) whose sentences
    are in `Sentences/<id>.txt` (or `sentences/`) beside it; one example per caption."""
    out = []
    for p in files:
        sdir = next((p.parent / d for d in ("Sentences", "sentences") if (p.parent / d).is_dir()), None)
        if sdir is None:
            raise ContractError(p, None, "Sentences", f"no Sentences/ folder beside {p.name}")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            img = line.strip()
            if not img:
                continue
            sf = sdir / f"{img}.txt"
            if not sf.is_file():
                raise ContractError(p, n, "image_id", f"no sentence file {sf}")
            for k, s in enumerate(sf.read_text(encoding="utf-8").splitlines(), start=1):
                if s.strip():
                    text = strip_entities(s)
                    if not text:
                        raise ContractError(sf, k, "sentence", "empty after removing the entity markup")
                    out.append(Example(f"{img}#{k - 1}", [img], text, None, [[f"{img}.jpg"]], {}))
    return out


def read_retrieval_karpathy(files: list[Path], split: str = "") -> list[Example]:
    """Karpathy `dataset_{coco,flickr8k,flickr30k}.json` (`images: [{filename, split, sentences:
    [{raw}]}]`) or `[{image_name, captions: [...]}]`."""
    out = []
    for p in files:
        d = _load_json(p)
        entries = d["images"] if isinstance(d, dict) and "images" in d else d
        if not isinstance(entries, list):
            raise ContractError(p, None, "images", "expected a list of images")
        for n, e in enumerate(entries, start=1):
            if not isinstance(e, dict):
                raise ContractError(p, n, "images", "expected an object")
            if not _split_ok(e.get("split", ""), split):
                continue
            img = _get(e, ("filename", "image_name", "image"), p, n, (str, int))
            if "sentences" in e:
                caps = [s.get("raw") if isinstance(s, dict) else s for s in _get(e, ("sentences",), p, n, list)]
            else:
                caps = _get(e, ("captions",), p, n, list)
            for k, c in enumerate(caps):
                if not isinstance(c, str) or not c.strip():
                    raise ContractError(p, n, "sentences", f"caption {k} is not a non-empty string")
                out.append(Example(f"{img}#{k}", [str(img)], c.strip(), None, [[]], {}))
    return out


def read_retrieval_flickr8k(files: list[Path], split: str = "") -> list[Example]:
    """Flickr8k `captions.tsv` (image, caption_index, caption; header) and, for `split`, the
    `split.tsv` beside it."""
    out = []
    for p in files:
        splits: dict[str, str] = {}
        sf = p.with_name("split.tsv")
        if split:
            if not sf.is_file():
                raise ContractError(p, None, "split", f"split {split!r} asked for but no split.tsv beside {p.name}")
            with open(sf, encoding="utf-8", newline="") as f:
                for row in list(csv.reader(f, delimiter="\t"))[1:]:
                    if len(row) >= 2:
                        splits[row[0]] = row[1].strip()
        with open(p, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if n == 1 and row[:1] == ["image"]:
                    continue
                if len(row) < 3:
                    raise ContractError(p, n, "caption", f"expected 3 tab-separated fields, got {len(row)}")
                if split and splits.get(row[0]) != split:
                    continue
                if not row[2].strip():
                    raise ContractError(p, n, "caption", "empty")
                out.append(Example(f"{row[0]}#{row[1]}", [row[0]], row[2].strip(), None, [[]], {}))
    return out


def read_retrieval_simple(files: list[Path], split: str = "") -> list[Example]:
    out = []
    for p in files:
        for n, r in _rows(p):
            if not _split_ok(r.get("split", ""), split):
                continue
            img = _get(r, ("image", "image_id"), p, n, (str, int))
            text = _get(r, ("caption", "text", "sentence"), p, n, str)
            out.append(Example(str(r.get("id", f"{p.stem}:{n}")), [str(img)], text, None, [[]], {}))
    return out


def _detect_retrieval(files: list[Path]) -> str:
    p = files[0]
    if p.suffix == ".tsv":
        return "flickr8k"
    if p.suffix == ".txt":
        return "flickr30k"
    first = _peek(p)
    if isinstance(first, dict) and "images" in first:
        return "karpathy"
    row = first[0] if isinstance(first, list) and first else first
    if isinstance(row, dict) and ("captions" in row or "sentences" in row):
        return "karpathy"
    return "simple"


register(TaskSpec("retrieval", "r_mean", {"flickr30k": read_retrieval_flickr30k, "karpathy": read_retrieval_karpathy,
                                           "flickr8k": read_retrieval_flickr8k, "simple": read_retrieval_simple},
                  _detect_retrieval))  # fmt: skip
