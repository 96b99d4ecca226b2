"""Importers against the shared real data, and bad input through the CLI."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysys.contract import read_manifest, read_table, region_arrays, validate_dataset
from raysys.data.importers import LXMERT_FIELDS, import_lxmert_tsv, import_texts, import_vinvl_tsv, read_vocab

ROOT = Path(__file__).resolve().parents[1]


def _tsv_rows(shared_data):
    lines = (shared_data / "region_features_lxmert_tsv" / "train.tsv").read_text().splitlines()
    return [dict(zip(LXMERT_FIELDS, ln.split("\t"))) for ln in lines]


def test_lxmert_tsv_values_and_tags(shared_data, tmp_path):
    tsv = shared_data / "region_features_lxmert_tsv" / "train.tsv"
    vocab_file = shared_data / "vg_vocab" / "objects_vocab.txt"
    man = import_lxmert_tsv(tsv, vocab_file, tmp_path / "d")
    assert man["counts"] == {"images": 8, "regions": 288} and man["feature_dim"] == 2048
    t = read_table(tmp_path / "d", "images")
    arr = region_arrays(t)
    assert arr["features"].shape == (288, 2048)
    vocab = read_vocab(vocab_file)
    rows = _tsv_rows(shared_data)
    for i, row in enumerate(rows):
        ref = np.frombuffer(base64.b64decode(row["features"]), np.float32).reshape(36, 2048)
        got = arr["features"][36 * i : 36 * (i + 1)].astype(np.float32)
        np.testing.assert_allclose(got, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)  # float16 rounding only
        ids = np.frombuffer(base64.b64decode(row["objects_id"]), np.int64)
        assert t.column("tags")[i].as_py() == [vocab[j] for j in ids]
        assert t.column("image_id")[i].as_py() == row["img_id"]
    all_tags = {x for tags in t.column("tags").to_pylist() for x in tags}
    assert {"bottle", "plant"} <= all_tags, sorted(all_tags)


def test_vinvl_roundtrip(shared_data, tmp_path):
    """Write the shared TSV in VinVL's two-file format and read it back to the same table."""
    rows = _tsv_rows(shared_data)
    vocab = read_vocab(shared_data / "vg_vocab" / "objects_vocab.txt")
    feat_lines, label_lines = [], []
    import json

    for r in rows:
        w, h = int(r["img_w"]), int(r["img_h"])
        boxes = np.frombuffer(base64.b64decode(r["boxes"]), np.float32).reshape(36, 4)
        feats = np.frombuffer(base64.b64decode(r["features"]), np.float32).reshape(36, 2048)
        norm = np.c_[boxes / [w, h, w, h], (boxes[:, 2:] - boxes[:, :2]) / [w, h]].astype(np.float32)
        full = np.c_[feats, norm].astype(np.float32)
        feat_lines.append(f"{r['img_id']}\t36\t{base64.b64encode(full.tobytes()).decode()}")
        ids = np.frombuffer(base64.b64decode(r["objects_id"]), np.int64)
        conf = np.frombuffer(base64.b64decode(r["objects_conf"]), np.float32)
        objs = [{"rect": boxes[k].tolist(), "class": vocab[ids[k]], "conf": float(conf[k])} for k in range(36)]
        label_lines.append(f"{r['img_id']}\t{json.dumps(objs)}")
    (tmp_path / "f.tsv").write_text("\n".join(feat_lines) + "\n")
    (tmp_path / "l.tsv").write_text("\n".join(label_lines) + "\n")
    import_vinvl_tsv(tmp_path / "f.tsv", tmp_path / "l.tsv", tmp_path / "v")
    import_lxmert_tsv(shared_data / "region_features_lxmert_tsv" / "train.tsv", shared_data / "vg_vocab" / "objects_vocab.txt", tmp_path / "x")
    a, b = read_table(tmp_path / "v", "images"), read_table(tmp_path / "x", "images")
    for col in ("image_id", "width", "height", "boxes", "features", "tags"):
        assert a.column(col).equals(b.column(col)), col


def test_flickr8k_and_coco_texts(shared_data, tmp_path):
    man = import_texts([shared_data / "flickr8k" / "captions.tsv"], "flickr8k", tmp_path / "f")
    assert man["counts"] == {"texts": 25000, "gold": 25000}
    gold = read_table(tmp_path / "f", "gold").to_pandas()
    assert gold.image_id.nunique() == 5000 and set(gold.split) == {"train", "dev"}
    assert gold.groupby("split").image_id.nunique().to_dict() == {"dev": 1000, "train": 4000}
    coco = shared_data / "text" / "coco_karpathy_captions"
    man = import_texts([coco / "mscoco_test.json", coco / "mscoco_val.json"], "coco-json", tmp_path / "c")
    assert man["counts"]["texts"] == 50000
    assert validate_dataset(tmp_path / "c")["texts"] == 50000


def test_lines_and_tsv_formats(tmp_path):
    (tmp_path / "a.txt").write_text("A dog runs.\nTwo cats sleep.\n")
    (tmp_path / "b.tsv").write_text("id\ttext\n1\tA red car.\n")
    import_texts([tmp_path / "a.txt"], "lines", tmp_path / "d")
    import_texts([tmp_path / "b.tsv"], "tsv", tmp_path / "e", column=1, header=True)
    assert read_table(tmp_path / "d", "texts").column("text").to_pylist() == ["A dog runs.", "Two cats sleep."]
    assert read_table(tmp_path / "e", "texts").column("text").to_pylist() == ["A red car."]
    assert read_manifest(tmp_path / "d")["counts"]["texts"] == 2


# ---------------------------------------------------------------- bad input through the CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "raysys", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _bad_tsv(shared_data, tmp_path, mutate) -> Path:
    first = (shared_data / "region_features_lxmert_tsv" / "train.tsv").read_text().splitlines()[:2]
    rows = [dict(zip(LXMERT_FIELDS, ln.split("\t"))) for ln in first]
    line2 = mutate(rows[1])
    p = tmp_path / "bad.tsv"
    p.write_text(first[0] + "\n" + line2 + "\n")
    return p


def _nan(row):
    f = np.frombuffer(base64.b64decode(row["features"]), np.float32).copy()
    f[5000] = np.nan
    row["features"] = base64.b64encode(f.tobytes()).decode()
    return "\t".join(row[k] for k in LXMERT_FIELDS)


CASES = {
    "truncated-row": (lambda r: "\t".join(r[k] for k in LXMERT_FIELDS[:8]), "row 2", "boxes"),
    "short-base64": (lambda r: "\t".join({**r, "features": r["features"][:4000]}[k] for k in LXMERT_FIELDS), "row 2", "features"),
    "nan-features": (_nan, "row 2", "features"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_tsv_rows(case, shared_data, tmp_path):
    mutate, where, field = CASES[case]
    bad = _bad_tsv(shared_data, tmp_path, mutate)
    out = tmp_path / "out"
    r = _cli("import", "lxmert-tsv", bad, "--vocab", shared_data / "vg_vocab" / "objects_vocab.txt", "--out", out)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert str(bad) in err[0] and where in err[0] and f"'{field}'" in err[0], err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing partial left behind


@pytest.mark.parametrize(
    "name,content,fmt,where,field",
    [
        ("empty.tsv", b"image\tcaption_index\tcaption\na.jpg\t0\tA dog.\na.jpg\t1\t   \n", "flickr8k", "row 3", "caption"),
        ("latin1.txt", b"A fine day.\nCaf\xe9 au lait.\n", "lines", "row 2", "text"),
    ],
)
def test_bad_texts(name, content, fmt, where, field, tmp_path):
    f = tmp_path / name
    f.write_bytes(content)
    out = tmp_path / "out"
    r = _cli("import", "texts", f, "--format", fmt, "--out", out)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and where in err[0] and f"'{field}'" in err[0], r.stderr
    assert not out.exists()


def test_bad_text_into_existing_dataset_keeps_it(small_world, tmp_path):
    """A failed import into an existing dataset leaves its tables untouched."""
    import shutil

    d = tmp_path / "w"
    shutil.copytree(small_world, d)
    before = read_table(d, "texts")
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok\n\xff\xfe\n")
    r = _cli("import", "texts", f, "--format", "lines", "--out", d)
    assert r.returncode != 0
    assert read_table(d, "texts").equals(before)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
