"""Bad input and faults through the real `raysys` command (issue 19).

Every user error is one line on stderr naming the file (and the row and field where there is one),
exit status 2, no traceback, and nothing new under the command's `--out` (hidden files included).
The error cases run as subprocesses of the installed CLI, several at a time (each pays Python's and
torch's start-up, not the work: they all fail before Ray starts). Tests that start Ray are `slow`.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysys.contract import TEXTS_SCHEMA, read_manifest, read_table
from raysys.locks import lock_path, output_lock

ROOT = Path(__file__).resolve().parents[1]
DIM = 4  # feature dim of the imported fixtures: the importers' checks, not the features, are under test
MARKER_NAME = "PAYLOAD-RAN"


def cli(*args, cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "raysys", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env, **kw)  # fmt: skip


def tree(path: Path) -> set[str]:
    """Every entry under `path`, hidden ones included (relative names); its hidden siblings too."""
    found = {f"../{p.name}" for p in path.parent.glob(f".{path.name}*")} if path.parent.is_dir() else set()
    if path.is_dir():
        found |= {str(p.relative_to(path)) for p in path.rglob("*")}
    elif path.exists():
        found.add(".")
    return found


# ---------------------------------------------------------------- fixture files


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def lxmert_row(img_id: str | bytes = "img1", n: int = 2, feats: np.ndarray | None = None, w: int = 100) -> bytes:
    boxes = np.array([[0, 0, 10, 10]] * n, np.float32)
    f = np.ones((n, DIM), np.float32) if feats is None else feats
    cells = [str(w), str(w), b64(np.zeros(n, np.int64)), b64(np.ones(n, np.float32)), "", "", str(n), b64(boxes), b64(f)]
    head = img_id if isinstance(img_id, bytes) else img_id.encode()
    return head + b"\t" + "\t".join(cells).encode() + b"\n"


def vinvl_files(d: Path, name: str, label: dict | bytes, key: str = "img1", n: int = 2) -> tuple[Path, Path]:
    full = np.c_[np.ones((n, DIM)), np.tile([0, 0, 0.1, 0.1, 0.1, 0.1], (n, 1))].astype(np.float32)
    feats, labels = d / f"{name}.feat.tsv", d / f"{name}.labels.tsv"
    feats.write_text(f"{key}\t{n}\t{b64(full)}\n")
    payload = label if isinstance(label, bytes) else json.dumps(label).encode()
    labels.write_bytes(key.encode() + b"\t" + payload + b"\n")
    return feats, labels


def good_label(n: int = 2, **extra) -> dict:
    return {"objects": [{"rect": [0, 0, 10, 10], "class": "dog", "conf": 0.9}] * n, **extra}


def tampered_checkpoints(d: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints whose pickle would create `marker` if anything unpickled them unsafely."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {"reduce-zip": d / "reduce.pt", "nested-zip": d / "nested.pt", "raw-pickle": d / "raw.pt",
             "empty": d / "empty.pt", "random": d / "random.pt"}  # fmt: skip
    torch.save(Payload(), files["reduce-zip"])
    torch.save({"format": "raysys.checkpoint/1", "extra": {"deep": [Payload()]}}, files["nested-zip"])
    files["raw-pickle"].write_bytes(pickle.dumps({"state_dict": Payload()}))
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    assert zipfile.is_zipfile(files["reduce-zip"]) and not marker.exists()
    return files


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One small world and the bad input files, built once for the module."""
    d = tmp_path_factory.mktemp("bad")
    r = cli("world", "--images", "20", "--out", d / "w20", cwd=d)
    assert r.returncode == 0, r.stderr
    (d / "vocab.txt").write_text("dog\ncat\n")
    (d / "good.tsv").write_bytes(lxmert_row("img1"))
    (d / "dup-id.tsv").write_bytes(lxmert_row("img1") + lxmert_row("img1"))
    (d / "nul-id.tsv").write_bytes(lxmert_row("img1") + lxmert_row(b"im\x00g2"))
    (d / "latin1-id.tsv").write_bytes(lxmert_row("img1") + lxmert_row(b"caf\xe9"))
    (d / "f16-overflow.tsv").write_bytes(lxmert_row("img1", feats=np.full((2, DIM), 1e6, np.float32)))
    (d / "bad-vocab.txt").write_bytes(b"dog\n\xff\xfe\n")
    (d / "texts-dir").mkdir()
    (d / "nul.txt").write_bytes(b"A dog.\nA c\x00at.\n")
    (d / "long.txt").write_text("A dog.\n" + "x" * 10_001 + "\n")
    for name, entries in {
        "captions-int": [{"image_name": "a.jpg", "captions": 5}],
        "captions-str": [{"image_name": "a.jpg", "captions": "A dog runs."}],
        "captions-num": [{"image_name": "a.jpg", "captions": ["A dog.", 7]}],
        "name-list": [{"image_name": "a.jpg", "captions": ["A dog."]}, {"image_name": ["b.jpg"], "captions": ["A cat."]}],
        "name-null": [{"image_name": None, "captions": ["A dog."]}],
    }.items():
        (d / f"{name}.json").write_text(json.dumps(entries))
    vinvl_files(d, "latin1", b'{"objects": [{"rect": [0,0,10,10], "class": "caf\xe9"}]}', n=1)
    vinvl_files(d, "wide", good_label(image_w="wide", image_h=100))
    vinvl_files(d, "conf", {"objects": [{"rect": [0, 0, 10, 10], "class": "dog", "conf": "high"}] * 2})
    vinvl_files(d, "ok", good_label(image_w=100, image_h=100))
    (d / "labelmap-bad.json").write_text('{"label_to_idx": {"dog": 0,')
    (d / "labelmap-neg.json").write_text(json.dumps({"label_to_idx": {"dog": -1}}))
    (d / "dup.yaml").write_text("world:\n  images: 5\n  images: 6\n")
    (d / "binary.yaml").write_bytes(np.random.default_rng(1).bytes(512))
    (d / "a-file").write_text("not a directory\n")
    (d / "ckpt").mkdir()
    tampered_checkpoints(d / "ckpt", d / MARKER_NAME)
    # a dataset whose texts table repeats an id, in a second shard (raysys validate must say where)
    import shutil

    shutil.copytree(d / "w20", d / "dup-texts")
    first = pq.read_table(next((d / "dup-texts" / "texts").glob("part-*.parquet")))
    pq.write_table(first.slice(3, 1).cast(TEXTS_SCHEMA), d / "dup-texts" / "texts" / "part-99999.parquet")
    return d


OUT = "<OUT>"  # each case's own --out: d/outs/NAME (cases run concurrently; a shared one would be locked)


# name -> (arguments, the --out (or data dir) that must not change, text the one line must contain)
def cases(d: Path) -> dict[str, tuple[list, Path | None, list[str]]]:
    c = _cases(d)
    return {name: ([d / "outs" / name if a == OUT else a for a in args], d / "outs" / name if out == OUT else out, needles)
            for name, (args, out, needles) in c.items()}  # fmt: skip


def _cases(d: Path) -> dict[str, tuple[list, Path | str | None, list[str]]]:
    w, out, ck = d / "w20", OUT, d / "ckpt"
    lx = ["import", "lxmert-tsv"]
    vin = ["import", "vinvl-tsv"]
    tx = ["import", "texts"]
    c: dict[str, tuple[list, Path | str | None, list[str]]] = {
        "missing-input": ([*lx, d / "nope.tsv", "--vocab", d / "vocab.txt", "--out", out], out, ["nope.tsv"]),
        "missing-vocab": ([*lx, d / "good.tsv", "--vocab", d / "nope.txt", "--out", out], out, ["nope.txt"]),
        "dir-as-input": ([*tx, d / "texts-dir", "--format", "lines", "--out", out], out, ["texts-dir"]),
        "missing-labels": ([*vin, d / "ok.feat.tsv", "--labels", d / "nope.tsv", "--feature-dim", DIM, "--out", out],
                           out, ["nope.tsv"]),
        "non-utf8-vocab": ([*lx, d / "good.tsv", "--vocab", d / "bad-vocab.txt", "--out", out], out,
                           ["bad-vocab.txt", "'vocab'"]),
        "duplicate-image-id": ([*lx, d / "dup-id.tsv", "--vocab", d / "vocab.txt", "--feature-dim", DIM, "--out", out],
                               out, ["dup-id.tsv", "row 2", "'img_id'", "duplicate"]),
        "nul-image-id": ([*lx, d / "nul-id.tsv", "--vocab", d / "vocab.txt", "--feature-dim", DIM, "--out", out],
                         out, ["nul-id.tsv", "row 2", "'img_id'"]),
        "non-utf8-image-id": ([*lx, d / "latin1-id.tsv", "--vocab", d / "vocab.txt", "--feature-dim", DIM, "--out", out],
                              out, ["latin1-id.tsv", "row 2", "'img_id'", "UTF-8"]),
        "float16-overflow": ([*lx, d / "f16-overflow.tsv", "--vocab", d / "vocab.txt", "--feature-dim", DIM, "--out", out],
                             out, ["f16-overflow.tsv", "row 1", "'features'", "float16"]),
        "nul-text": ([*tx, d / "nul.txt", "--format", "lines", "--out", out], out, ["nul.txt", "row 2", "'text'", "NUL"]),
        "long-text-strict": ([*tx, d / "long.txt", "--format", "lines", "--strict", "--out", out], out,
                             ["long.txt", "row 2", "max_text_chars"]),
        "vinvl-non-utf8-labels": ([*vin, d / "latin1.feat.tsv", "--labels", d / "latin1.labels.tsv", "--feature-dim", DIM,
                                   "--out", out], out, ["latin1.labels.tsv", "row 1", "'labels'", "UTF-8"]),
        "vinvl-image-w-wide": ([*vin, d / "wide.feat.tsv", "--labels", d / "wide.labels.tsv", "--feature-dim", DIM,
                                "--out", out], out, ["wide.labels.tsv", "row 1", "'image_w'"]),
        "vinvl-conf-high": ([*vin, d / "conf.feat.tsv", "--labels", d / "conf.labels.tsv", "--feature-dim", DIM,
                             "--out", out], out, ["conf.labels.tsv", "row 1", "'conf'"]),
        "vinvl-labelmap-malformed": ([*vin, d / "ok.feat.tsv", "--labels", d / "ok.labels.tsv", "--labelmap",
                                      d / "labelmap-bad.json", "--feature-dim", DIM, "--out", out], out,
                                     ["labelmap-bad.json", "'labelmap'"]),
        "vinvl-labelmap-negative": ([*vin, d / "ok.feat.tsv", "--labels", d / "ok.labels.tsv", "--labelmap",
                                     d / "labelmap-neg.json", "--feature-dim", DIM, "--out", out], out,
                                    ["labelmap-neg.json", "'label_to_idx'", "-1"]),
        "world-images-0": (["world", "--images", 0, "--out", out], out, ["images"]),
        "world-images-negative": (["world", "--images", -10, "--out", out], out, ["images", "-10"]),
        "world-binary-yaml": (["world", "--config", d / "binary.yaml", "--out", out], out, ["binary.yaml"]),
        "world-duplicate-keys": (["world", "--config", d / "dup.yaml", "--out", out], out, ["dup.yaml", "duplicate key"]),
        "pretrain-lr-nan": (["pretrain", "--local", "--data", w, "--dry-run", "lr=.nan"], None, ["lr"]),
        "pretrain-epochs-0": (["pretrain", "--local", "--data", w, "--dry-run", "epochs=0"], None, ["epochs"]),
        "pretrain-steps-negative": (["pretrain", "--data", w, "--dry-run", "steps=-3"], None, ["steps"]),
        "retrieve-k-0": (["retrieve", "--data", w, "--k", 0], w, ["k"]),
        "retrieve-unknown-factory": (["retrieve", "--data", w, "index=IVF,Bogus"], w, ["retrieval.index", "IVF,Bogus"]),
        "retrieve-dry-run-factory": (["retrieve", "--data", w, "--dry-run", "--index", "Nope"], w, ["Nope"]),
        "retrieve-missing-data": (["retrieve", "--data", d / "no-data"], d / "no-data", ["no-data"]),
        "phrases-duplicate-keys": (["phrases", "--data", w, "--config", d / "dup.yaml"], w, ["dup.yaml"]),
        "featurize-out-is-a-file": (["featurize", "--images", d / "texts-dir", "--out", d / "a-file", "--no-ray"],
                                    d / "a-file", ["a-file", "not a directory"]),
        "validate-missing-dir": (["validate", d / "no-such-dataset"], d / "no-such-dataset", ["no-such-dataset"]),
        "validate-duplicate-text-id": (["validate", d / "dup-texts"], d / "dup-texts",
                                       ["part-99999.parquet", "row 0", "'text_id'", "duplicate"]),
    }
    for name, entries in (("captions-int", "captions"), ("captions-str", "captions"), ("captions-num", "captions"),
                          ("name-list", "image_name"), ("name-null", "image_name")):  # fmt: skip
        row = "row 2" if name == "name-list" else "row 1"
        c[f"coco-{name}"] = ([*tx, d / f"{name}.json", "--format", "coco-json", "--out", out], out,
                             [f"{name}.json", row, f"'{entries}'"])
    for kind in ("reduce-zip", "nested-zip", "raw-pickle", "empty", "random"):
        f = ck / {"reduce-zip": "reduce.pt", "nested-zip": "nested.pt", "raw-pickle": "raw.pt",
                  "empty": "empty.pt", "random": "random.pt"}[kind]  # fmt: skip
        c[f"export-{kind}"] = (["export", f, "--out", out], out, [f.name, "not a safe raysys checkpoint"])
        c[f"zeroshot-{kind}"] = (["evaluate", "zeroshot", "--checkpoint", f, "--data", w], w,
                                 [f.name, "not a safe raysys checkpoint"])
        if kind in ("reduce-zip", "nested-zip", "raw-pickle"):
            c[f"finetune-{kind}"] = (["evaluate", "finetune", "--checkpoint", f, "--task", "retrieval", "--train", w,
                                      "--eval", w, "--images", w], w, [f.name, "not a safe raysys checkpoint"])
    return c


@pytest.fixture(scope="module")
def outcomes(base):
    """Run every case (a few at a time): name -> (result, tree before, tree after)."""
    all_cases = cases(base)
    before = {name: tree(out) if out is not None else set() for name, (_, out, _) in all_cases.items()}

    def run(name):
        args, out, _ = all_cases[name]
        return name, cli(*args, cwd=base / "cwd" / name)

    for name in all_cases:
        (base / "cwd" / name).mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(run, sorted(all_cases)))
    return {name: (results[name], before[name], tree(all_cases[name][1]) if all_cases[name][1] else set())
            for name in all_cases}  # fmt: skip


CASE_NAMES = sorted(cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_line_and_exit_2(name, outcomes, base):
    r, before, after = outcomes[name]
    _, out, needles = cases(base)[name]
    both = r.stdout + r.stderr
    assert r.returncode == 2, both
    assert "Traceback" not in both, both
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("raysys: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "weights_only" not in both
    assert after == before, (out, after ^ before)
    assert not list((base / "cwd" / name).iterdir()), "nothing written to the working directory"


def test_no_payload_ever_ran(outcomes, base):
    assert not (base / MARKER_NAME).exists()


def test_debug_shows_the_traceback(base):
    r = cli("--debug", "world", "--images", 0, "--out", base / "debug-out", cwd=base)
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("raysys: error: images")


def test_internal_error_keeps_its_traceback(base, tmp_path):
    """Not a user error (here a plugin with a bug): the traceback is the report, exit status 1."""
    (tmp_path / "buggy_plugin.py").write_text("x = 1 / 0\n")
    r = cli("--plugin", tmp_path / "buggy_plugin.py", "world", "--images", 3, "--out", tmp_path / "w", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


def test_job_entrypoint_user_error_is_one_line(base):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", base / "dup.yaml",
                        "--out", base / "job-out", "--dry-run"], capture_output=True, text=True, env=env, cwd=base)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dup.yaml" in lines[0] and "duplicate key" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (base / "job-out").exists()


# ---------------------------------------------------------------- accepted input, checked


def test_long_texts_are_counted_and_skipped(base, tmp_path):
    r = cli("import", "texts", base / "long.txt", "--format", "lines", "--out", tmp_path / "t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert json.loads(last)["skipped"] == {"over_max_text_chars": 1} and ", " not in last  # compact JSON
    assert read_table(tmp_path / "t", "texts").column("text").to_pylist() == ["A dog."]
    prov = read_manifest(tmp_path / "t")["provenance"][-1]
    assert prov["skipped_over_max_text_chars"] == 1


def test_same_stem_files_get_distinct_text_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "caps.txt").write_text("A dog.\nA cat.\n")
    (tmp_path / "b" / "caps.txt").write_text("A bird.\n")
    r = cli("import", "texts", tmp_path / "a" / "caps.txt", tmp_path / "b" / "caps.txt", "--format", "lines",
            "--out", tmp_path / "t", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = read_table(tmp_path / "t", "texts").column("text_id").to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3
    r = cli("validate", tmp_path / "t", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["counts"]["texts"] == 3


@pytest.mark.parametrize("stage", ["retrieve", "phrases", "embed", "assemble"])
def test_dry_run_prints_the_resolved_config_as_compact_json(stage, base):
    w = base / "w20"
    before = tree(w)
    r = cli(stage, "--data", w, "--dry-run", cwd=base)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    cfg = json.loads(last)
    assert isinstance(cfg, dict) and cfg and ": " not in last and ", " not in last
    if stage == "retrieve":
        assert cfg["k"] == 5 and cfg["index"] == "Flat"
    assert tree(w) == before


# ---------------------------------------------------------------- nothing left behind


def test_second_run_on_a_locked_out_exits_2_naming_the_holder(base):
    w = base / "w20"
    before = tree(w)
    with output_lock(w):  # this test process is the first run
        assert lock_path(w).exists()
        r = cli("retrieve", "--data", w, cwd=base)
        r2 = cli("import", "texts", base / "long.txt", "--format", "lines", "--out", w, cwd=base)
    assert not lock_path(w).exists()
    for res in (r, r2):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert f"pid {os.getpid()}" in lines[0] and str(w) in lines[0], lines[0]
        assert "Traceback" not in res.stdout + res.stderr
    assert tree(w) == before


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "w"
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "raysys world"}))
    r = cli("world", "--images", 5, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["images"] == 5
    assert not lock_path(out).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_killed_import_leaves_no_tmp_after_a_rerun(tmp_path):
    """Kill `raysys import texts` while it holds its temporaries (it blocks reading a FIFO), then
    re-run it: the stale `.tmp-*` entries are swept, the lock is taken over."""
    fifo = tmp_path / "texts.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "data"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "raysys", "import", "texts", str(fifo), "--format", "lines",
                          "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        w = os.open(fifo, os.O_WRONLY)  # blocks until the import opened the FIFO: its temporaries exist
        os.write(w, b"A dog runs.\n")
        deadline = time.time() + 60
        while not any(".tmp" in p.name for p in tmp_path.rglob(".*")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        os.close(w)
    finally:
        if p.poll() is None:
            p.kill()
    left = [q for q in tmp_path.rglob(".*") if ".tmp" in q.name]
    assert left and lock_path(out).exists(), "the killed import left its temporaries and its lock"
    (tmp_path / "texts.txt").write_text("A dog runs.\nTwo cats sleep.\n")
    r = cli("import", "texts", tmp_path / "texts.txt", "--format", "lines", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not [q for q in tmp_path.rglob("*") if ".tmp" in q.name or q.name.endswith("raysys-lock")]
    assert read_table(out, "texts").num_rows == 2


# ---------------------------------------------------------------- with Ray


@pytest.mark.slow
def test_k_above_the_corpus_warns_and_reports_the_k_stored(tmp_path):
    out = tmp_path / "w"
    assert cli("world", "--images", 8, "--out", out, cwd=tmp_path).returncode == 0
    n_texts = read_table(out, "texts").num_rows
    r = cli("retrieve", "--data", out, "--k", n_texts + 7, "--shards", 1, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["k_stored"] == n_texts and "warnings" in report
    assert f"retrieval.k={n_texts + 7}" in r.stderr


@pytest.mark.slow
def test_strict_featurize_error_is_the_last_line_with_no_ray_traceback(tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(imgs / f"ok{i}.png")
    (imgs / "bad.jpg").write_bytes(b"not an image")
    r = cli("featurize", "--images", imgs, "--out", tmp_path / "out", "--strict", "actors=1", cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("raysys: error:")]
    assert len(errors) == 1 and "bad.jpg" in errors[0] and r.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_wrapped_user_errors_are_one_line(ray_session, tmp_path):
    """A user error raised in a task, an actor's constructor or a Ray Data UDF reaches the driver
    inside Ray's wrappers: the handler finds it; an internal error stays internal."""
    import ray

    from raysys.cli import user_error
    from raysys.config import ConfigError

    def task():
        raise ConfigError("retrieval.k: must be at least 1, got 0")

    def _bad_udf(batch):  # defined here: cloudpickle ships it by value (workers cannot import tests/)
        from raysys.contract import ContractError

        raise ContractError("captions.tsv", 7, "caption", "empty text")

    class _BadActor:
        def __init__(self, path: str):
            open(path).close()

        def ping(self) -> int:
            return 1

    with pytest.raises(Exception) as e:
        ray.get(ray.remote(task).remote())
    assert user_error(e.value) == "retrieval.k: must be at least 1, got 0"
    with pytest.raises(Exception) as e:
        ray.get(ray.remote(_BadActor).remote(str(tmp_path / "nope.txt")).ping.remote())
    assert user_error(e.value) == f"{tmp_path / 'nope.txt'}: No such file or directory"
    with pytest.raises(Exception) as e:
        ray.data.range(4).map_batches(_bad_udf).take_all()
    assert user_error(e.value) == "captions.tsv: row 7: field 'caption': empty text"
    with pytest.raises(Exception) as e:
        ray.get(ray.remote(lambda: 1 / 0).remote())
    assert user_error(e.value) is None
