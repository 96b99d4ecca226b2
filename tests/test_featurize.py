"""`raysys featurize`: RoIAlign against references, the backend registry, bad-input handling, the
real YOLOv3-tiny + EfficientNet-Lite0 backend, the Ray pipeline end to end through the CLI (report,
manifest, contract validation), restart, and strict mode."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysys.config import ConfigError
from raysys.contract import ContractError, read_manifest, read_table, region_arrays, validate_dataset
from raysys.data import detectors
from raysys.data.detectors import Detections, roi_align
from raysys.data.featurize import BadImage, FeaturizeConfig, decode_image, featurize

DOG = "1001773457_577c3a7d70.jpg"  # two dogs; YOLOv3-tiny finds at least one
PERSON = "1000268201_693b08cb0e.jpg"  # a girl on stairs


# ---------------------------------------------------------------- RoIAlign


def test_roi_align_linear_ramp_matches_hand_computed_values():
    """On f(y, x) = 10 y + x bilinear interpolation is exact, so each bin's mean over its sample
    points is f at the bin centre. Box x 1..5, y 2..4, 2x2 bins: bins are 2 wide and 1 high."""
    h, w = 8, 8
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    fmap = torch.stack([10 * ys + xs, 100 + 10 * ys + xs]).unsqueeze(0)  # (1, 2, 8, 8); channel 1 = +100
    box = torch.tensor([[0, 1.0, 2.0, 5.0, 4.0]], dtype=torch.float64)
    # not aligned: bin centres x in {2, 4}, y in {2.5, 3.5} -> 10*2.5+2 = 27, 29, 37, 39
    out = roi_align(fmap, box, (2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False)
    expected = torch.tensor([[27.0, 29.0], [37.0, 39.0]], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], expected + 100)
    # aligned: every coordinate shifts by -0.5 -> each value by -(10*0.5 + 0.5) = -5.5
    out = roi_align(fmap, box, (2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(out[0, 0], expected - 5.5)
    # spatial_scale halves the box: x 0.5..2.5, y 1..2 -> centres x {1, 2}, y {1.25, 1.75}
    out = roi_align(fmap, box, (2, 2), spatial_scale=0.5, sampling_ratio=2, aligned=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[13.5, 14.5], [18.5, 19.5]], dtype=torch.float64))
    # the list-of-boxes form is the same RoI
    out2 = roi_align(fmap, [box[:, 1:]], (2, 2), 0.5, 2, False)
    torch.testing.assert_close(out2, out)


def _bilinear_ref(f, height, width, y, x):
    """torchvision's CPU bilinear_interpolate, transcribed line by line."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[y_low][x_low] + hy * lx * f[y_low][x_high] + ly * hx * f[y_high][x_low] + ly * lx * f[y_high][x_high]


def _roi_align_ref(inp, rois, ph, pw, scale, sampling, aligned):
    """torchvision's roi_align_forward_kernel_impl as plain loops (an independent code path)."""
    _, c, height, width = inp.shape
    out = np.zeros((len(rois), c, ph, pw))
    off = 0.5 if aligned else 0.0
    for k, r in enumerate(rois):
        b = int(r[0])
        x1, y1, x2, y2 = (v * scale - off for v in r[1:])
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling if sampling > 0 else math.ceil(rh / ph)
        gw = sampling if sampling > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        for ch in range(c):
            for i in range(ph):
                for j in range(pw):
                    s = 0.0
                    for iy in range(gh):
                        y = y1 + i * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = x1 + j * bw + (ix + 0.5) * bw / gw
                            s += _bilinear_ref(inp[b, ch], height, width, y, x)
                    out[k, ch, i, j] = s / count
    return out


@pytest.mark.parametrize("sampling", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_reference_loops_including_borders(sampling, aligned):
    rng = np.random.default_rng(0)
    fmap = torch.from_numpy(rng.normal(size=(2, 3, 7, 9)))
    rois = []
    for k in range(30):  # boxes partly or wholly outside the map, degenerate and inverted ones too
        x1, y1 = rng.uniform(-3, 10, 2)
        bw, bh = rng.uniform(-1, 8, 2)
        rois.append([k % 2, x1, y1, x1 + bw, y1 + bh])
    rois.append([0, 0, 0, 9, 7])
    rois = torch.tensor(rois, dtype=torch.float64)
    for scale in (1.0, 0.5):
        got = roi_align(fmap, rois, (3, 2), scale, sampling, aligned).numpy()
        ref = _roi_align_ref(fmap.numpy(), rois.numpy(), 3, 2, scale, sampling, aligned)
        np.testing.assert_allclose(got, ref, atol=1e-12)


# ---------------------------------------------------------------- registry


@detectors.register_detector("test-fixed-box")
class _FixedBox(detectors.Detector):
    """Always one box: the top-left quarter, class 1 ("square")."""

    def __init__(self, **_):
        pass

    @classmethod
    def vocabulary(cls):
        return ["circle", "square"]

    def detect(self, images):
        out = []
        for im in images:
            h, w = im.shape[:2]
            out.append(Detections(np.array([[0, 0, w / 2, h / 2]], np.float32), np.array([0.9], np.float32),
                                  np.array([1], np.int32)))
        return out


@detectors.register_features("test-mean-colour")
class _MeanColour(detectors.RegionFeatures):
    """The mean RGB inside each (integer-rounded) box."""

    def __init__(self, **_):
        pass

    @classmethod
    def feature_dim(cls):
        return 3

    def features(self, images, boxes):
        out = []
        for im, bs in zip(images, boxes):
            rows = [im[int(b[1]):int(b[3]), int(b[0]):int(b[2])].reshape(-1, 3).mean(0) for b in bs]
            out.append(np.array(rows, np.float32))
        return out


def test_backend_registry_lookup_and_custom_backend_in_the_pipeline(tmp_path):
    assert detectors.resolve_backend("yolo-effnet") == ("yolov3-tiny", "efficientnet-lite0")
    assert detectors.resolve_backend("test-fixed-box+test-mean-colour") == ("test-fixed-box", "test-mean-colour")
    with pytest.raises(KeyError, match="registered"):
        detectors.resolve_backend("no-such-backend")
    with pytest.raises(ConfigError, match="unknown backend"):
        featurize(FeaturizeConfig(backend="vinvl"), tmp_path, tmp_path / "out", use_ray=False)

    src = tmp_path / "in"
    src.mkdir()
    img = np.zeros((40, 60, 3), np.uint8)
    img[:20, :30] = (200, 100, 50)  # the detected quarter
    Image.fromarray(img).save(src / "a.png")
    out = tmp_path / "out"
    rep = featurize(FeaturizeConfig(backend="test-fixed-box+test-mean-colour"), src, out, use_ray=False)
    assert rep["images"] == 1 and rep["with_detection_share"] == 1.0
    t = read_table(out, "images")
    assert t.column("tags").to_pylist() == [["square", ""]]
    feats = region_arrays(t)["features"].astype(np.float32)
    np.testing.assert_allclose(feats[0], [200, 100, 50])  # the box's mean colour
    np.testing.assert_allclose(feats[1], [50, 25, 12.5])  # the whole image: a quarter of it coloured
    man = read_manifest(out)
    assert man["tag_vocab"] == ["circle", "square"] and man["feature_dim"] == 3


# ---------------------------------------------------------------- decoding bad input


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(shared_data: Path, name: str = DOG) -> Image.Image:
    return Image.open(shared_data / "flickr8k" / "images" / name).convert("RGB")


def test_decode_handles_and_rejects_bad_inputs(shared_data):
    photo = _photo(shared_data)
    good = decode_image(_jpeg(photo))
    assert good.rgb.shape == (224, 224, 3) and good.rgb.dtype == np.uint8 and good.notes == []

    gray = decode_image(_jpeg(photo.convert("L")))
    assert gray.rgb.shape == (224, 224, 3) and "grayscale" in gray.notes
    assert (gray.rgb[..., 0] == gray.rgb[..., 1]).all()

    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent -> white background
    dec = decode_image(_png(rgba))
    assert "alpha: composited on white" in dec.notes and (dec.rgb == 255).all()

    deep = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 16-bit grayscale
    assert deep.mode.startswith("I")
    dec = decode_image(_png(deep))
    assert "grayscale" in dec.notes and dec.rgb.max() > 200

    big = decode_image(_jpeg(photo.resize((3000, 2000))), max_side=1024)
    assert (big.width, big.height) == (3000, 2000) and max(big.rgb.shape[:2]) == 1024
    assert any(n.startswith("downscaled") for n in big.notes)

    data = _jpeg(photo)
    cases = {
        "truncated": (data[: len(data) // 2], "corrupt or truncated JPEG"),
        "garbage after header": (data[:20] + bytes(range(256)) * 20, "corrupt JPEG"),
        "text": (b"hello, I am not a photo\n", "not an image"),
        "empty": (b"", "empty file"),
        "tiny": (_png(Image.new("RGB", (4, 4))), "too small"),
    }
    for label, (raw, reason) in cases.items():
        with pytest.raises(BadImage, match=reason):
            decode_image(raw)
        assert label
    with pytest.raises(BadImage, match="too large"):
        decode_image(_png(Image.new("L", (3000, 3000))), max_pixels=1_000_000)  # refused from the header


# ---------------------------------------------------------------- the real default backend


def test_default_backend_detects_a_dog_and_gives_declared_feature_dim(shared_data):
    yolo = detectors.YoloV3Tiny(min_score=0.2)
    vocab = detectors.YoloV3Tiny.vocabulary()
    assert len(vocab) == 80 and vocab[0] == "person" and vocab[16] == "dog" and vocab[-1] == "toothbrush"
    img = np.asarray(_photo(shared_data, DOG))
    blank = np.full((224, 224, 3), 128, np.uint8)
    dog, none = yolo.detect([img, blank])
    assert "dog" in {vocab[c] for c in dog.class_ids}
    assert len(none) == 0
    assert (np.diff(dog.scores) <= 0).all() and (dog.scores >= 0.2).all()
    assert (dog.boxes[:, :2] >= 0).all() and (dog.boxes[:, 2] <= 224).all() and (dog.boxes[:, 3] <= 224).all()

    eff = detectors.EfficientNetLite0()
    boxes = [np.concatenate([dog.boxes, [[0, 0, 224, 224]]]).astype(np.float32), np.array([[0, 0, 224, 224]], np.float32)]
    feats = eff.features([img, blank], boxes)
    assert feats[0].shape == (len(dog) + 1, detectors.EfficientNetLite0.feature_dim()) == (len(dog) + 1, 1280)
    assert np.isfinite(feats[0]).all() and (feats[0] >= 0).all() and (feats[0] <= 6).all()  # ReLU6 activations
    assert not np.allclose(feats[0][0], feats[0][-1])  # a dog box is not the whole photo


# ---------------------------------------------------------------- the pipeline on Ray, via the CLI


@pytest.fixture
def mixed_folder(tmp_path, shared_data) -> Path:
    """Two real photos, a grayscale one, an RGBA PNG, a blank image, and four bad files."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    src = shared_data / "flickr8k" / "images"
    shutil.copy(src / DOG, d / "dog.jpg")
    shutil.copy(src / PERSON, d / "sub" / "person.jpg")
    _photo(shared_data, DOG).convert("L").save(d / "gray.jpg")
    rgba = _photo(shared_data, PERSON).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    Image.new("RGB", (200, 150), (128, 128, 128)).save(d / "blank.png")
    raw = (src / PERSON).read_bytes()
    (d / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8)))
    (d / "notes.txt").write_text("not a photo\n")
    Image.new("RGB", (3, 3)).save(d / "tiny.png")
    (d / ".hidden.jpg").write_bytes(raw)  # hidden files are ignored
    return d


BAD = {"truncated.jpg", "corrupt.jpg", "notes.txt", "tiny.png"}


def test_featurize_cli_on_ray_reports_bad_files_and_restarts(ray_session, mixed_folder, tmp_path, capsys):
    from raysys.cli import main

    out = tmp_path / "ds"
    args = ["featurize", "--images", str(mixed_folder), "--out", str(out), "--shard-size", "3", "--batch-size", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "featurize: 5 images from 9 files (4 failed)" in printed and "truncated.jpg" in printed

    rep = json.loads((out / "featurize_report.json").read_text())
    assert rep["files"] == 9 and rep["images"] == 5 and rep["failed"] == 4
    assert {Path(f["file"]).name for f in rep["failures"]} == BAD
    reasons = {Path(f["file"]).name: f["reason"] for f in rep["failures"]}
    assert reasons["notes.txt"].startswith("not an image") and reasons["tiny.png"].startswith("too small")
    assert reasons["truncated.jpg"].startswith("corrupt or truncated JPEG")
    handled = {Path(h["file"]).name: h["notes"] for h in rep["handled"]}
    assert "grayscale" in handled["gray.jpg"] and "alpha" in handled["alpha.png"]
    assert 0 < rep["with_detection_share"] < 1 and rep["regions_min"] >= 2
    assert rep["regions_mean"] == pytest.approx(rep["regions_total"] / 5)
    assert rep["tag_histogram"].get("dog", 0) >= 1 and rep["shards"] == 3 and rep["shards_written"] == 3

    assert validate_dataset(out)["images"] == 5
    man = read_manifest(out)
    assert man["feature_dim"] == 1280 and len(man["tag_vocab"]) == 80 and man["counts"]["images"] == 5
    t = read_table(out, "images")
    rows = {r["image_id"]: r for r in t.select(["image_id", "width", "height", "boxes", "tags", "class_ids"]).to_pylist()}
    assert set(rows) == {"alpha.png", "blank.png", "dog.jpg", "gray.jpg", "sub/person.jpg"}
    blank = rows["blank.png"]  # nothing detected: whole image + 2x2 grid, no detector class
    assert blank["class_ids"] == [-1] * 5 and blank["tags"] == [""] * 5
    assert blank["boxes"][0] == [0, 0, 200, 150] and blank["boxes"][1] == [0, 0, 100, 75]
    dog = rows["dog.jpg"]
    assert "dog" in dog["tags"] and dog["class_ids"][-1] == -1 and dog["boxes"][-1] == [0, 0, 224, 224]
    assert all(c >= 0 for c in dog["class_ids"][:-1])  # detections, then only the whole image
    assert rows["gray.jpg"]["boxes"][-1] == [0, 0, 224, 224] or rows["gray.jpg"]["class_ids"] == [-1] * 5

    # restart: finished shards are skipped; a deleted shard is rebuilt identically
    shards = sorted((out / "images").glob("part-*.parquet"))
    assert len(shards) == 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    old = read_table(out, "images")
    shards[1].unlink()
    assert main(args) == 0
    rep2 = json.loads((out / "featurize_report.json").read_text())
    assert rep2["shards_skipped"] == 2 and rep2["shards_written"] == 1 and rep2["processed_this_run"] == 3
    assert rep2["images"] == 5 and rep2["failed"] == 4  # the report still covers every shard
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").glob("part-*.parquet"))}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    new = read_table(out, "images")
    assert new.column("image_id").to_pylist() == old.column("image_id").to_pylist()
    assert new.column("tags").to_pylist() == old.column("tags").to_pylist()

    # nothing left to do: a third run touches no shard
    assert main(args) == 0
    assert json.loads((out / "featurize_report.json").read_text())["shards_written"] == 0

    # other settings on the same output are refused instead of mixing shards
    assert main(args + ["--min-score", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_strict_mode_fails_on_the_first_bad_file(mixed_folder, tmp_path):
    with pytest.raises(ContractError, match=r"(truncated|corrupt)\.jpg|notes\.txt|tiny\.png"):
        featurize(FeaturizeConfig(strict=True, shard_size=100, batch_size=1), mixed_folder, tmp_path / "strict", use_ray=False)
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(mixed_folder / "dog.jpg", good / "dog.jpg")
    rep = featurize(FeaturizeConfig(strict=True), good, tmp_path / "ok", use_ray=False)
    assert rep["images"] == 1 and rep["failed"] == 0


def test_bench_featurize_prints_json_last(ray_session, shared_data, capsys):
    import argparse

    from raysys.bench import featurize as bench_featurize
    from raysys.commands.bench import BENCHES, _run

    assert BENCHES["featurize"] == "raysys.bench.featurize"
    parser = argparse.ArgumentParser()
    bench_featurize.add_arguments(parser)
    fl = shared_data / "flickr8k"
    args = parser.parse_args(["--images", str(fl / "images"), "--limit", "4",
                              "--captions", str(fl / "captions.tsv"), "--split", str(fl / "split.tsv")])
    assert _run(bench_featurize, args) == 0  # what `raysys bench featurize` calls
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["images"] == 4 and res["images_ok"] == 4
    for key in ("images_per_s", "baseline_images_per_s", "ratio", "peak_rss_mb"):
        assert res[key] > 0, key
    assert res["ratio"] == pytest.approx(res["images_per_s"] / res["baseline_images_per_s"], rel=0.05)
    assert res["outputs_match"]["same_tags"] and res["outputs_match"]["max_feature_diff"] < 0.05
    q = res["tag_quality"]
    assert q["split"] == "train" and q["images"] == 4 and set(q["words"]) >= {"dog", "person", "bicycle", "car", "horse"}
    assert any(line.startswith("tag quality vs captions") for line in lines)


# ---------------------------------------------------------------- the ImageNet labels (second tag source)


def test_top_labels_keep_the_best_and_those_above_the_threshold():
    probs = np.array([[0.05, 0.6, 0.3, 0.05], [0.25, 0.25, 0.25, 0.25]], np.float32)
    a, b = detectors.top_labels(probs, ["a", "b", "c", "d"], top=3, min_score=0.1)
    assert a.names == ["b", "c"] and np.allclose(a.scores, [0.6, 0.3])
    assert b.names == ["a", "b", "c"]  # ties keep the lower class index
    (only,) = detectors.top_labels(np.array([[0.02, 0.03, 0.95]]), ["a", "b", "c"], top=2, min_score=0.99)
    assert only.names == ["c"]  # below the threshold, the best label is still kept


def test_imagenet_labels_appear_in_the_images_table_when_enabled(shared_data, tmp_path):
    from raysys.data.imagenet_labels import IMAGENET_CLASSES

    src = tmp_path / "in"
    src.mkdir()
    for name in (DOG, PERSON):
        shutil.copy(shared_data / "flickr8k" / "images" / name, src / name)
    rep = featurize(FeaturizeConfig(imagenet_top=3, imagenet_min_score=0.05), src, tmp_path / "on", use_ray=False)
    t = read_table(tmp_path / "on", "images")
    labels, scores = t.column("image_tags").to_pylist(), t.column("image_tag_scores").to_pylist()
    assert t.column("image_id").to_pylist() == [PERSON, DOG]  # sorted file names
    for names, p in zip(labels, scores):
        assert 1 <= len(names) <= 3 and len(p) == len(names) and set(names) <= set(IMAGENET_CLASSES)
        assert all(0 < x <= 1 for x in p) and p == sorted(p, reverse=True) and all(x >= 0.05 for x in p[1:])
    dog_breeds = set(IMAGENET_CLASSES[151:269])  # ImageNet classes 151..268 are dog breeds
    assert labels[1][0] in dog_breeds, labels[1]  # two dogs: the head's best label is a breed
    assert rep["image_tag_images"] and rep["image_tags_mean"] >= 1
    assert t.column("tags").to_pylist()[1][0] == "dog"  # the detector's tags are untouched
    validate_dataset(tmp_path / "on")
    assert "ImageNet top 3" in read_manifest(tmp_path / "on")["provenance"][-1]["image_tags"]

    assert FeaturizeConfig().imagenet_top == 5  # on by default: the best retrieval uses the labels
    featurize(FeaturizeConfig(imagenet_top=0), src, tmp_path / "off", use_ray=False)
    assert "image_tags" not in read_table(tmp_path / "off", "images").column_names
    # a backend without an image classifier stores none (and says so), whatever imagenet_top says
    featurize(FeaturizeConfig(backend="test-fixed-box+test-mean-colour"), src, tmp_path / "x", use_ray=False)
    assert "image_tags" not in read_table(tmp_path / "x", "images").column_names
