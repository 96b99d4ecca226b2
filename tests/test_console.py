"""The console a command leaves: progress bars only at a terminal (or when forced), quiet library
start-up, and the compact JSON result as the last stdout line (raysys.progress)."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from raysys import progress

ROOT = Path(__file__).resolve().parents[1]
RAYSYS = [sys.executable, "-m", "raysys"]
BAR_RATE = ("it/s", "row/s", "img/s", "s/it", "s/row", "s/img")  # tqdm's rate field, either way round


def _env(**force: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYSYS_PROGRESS", "CI", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["RAYSYS_RAY_TMP"] = os.environ.get("RAYSYS_TEST_RAY_TMP", "/tmp/raysys-ray") + "-console"
    return {**env, **force}


def _run(args: list[str], **force: str) -> subprocess.CompletedProcess:
    """`raysys ARGS` with stdout and stderr on pipes, decoded as they were written ("\\r" kept)."""
    r = subprocess.run(RAYSYS + args, cwd=ROOT, env=_env(**force), capture_output=True, timeout=600)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _last_json(stdout: str) -> dict:
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("{") and "\n" not in line
    return json.loads(line)


def _run_on_a_terminal(args: list[str], **force: str) -> tuple[str, str]:
    """Run `python ARGS` with stderr on a real pseudo-terminal (stdout stays a pipe); returns
    (stdout, stderr)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size: 24 × 100
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not b:
                return
            chunks.append(b)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(**force), stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        out, _ = p.communicate(timeout=600)
        reader.join(timeout=30)
    finally:
        os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, err[-3000:]
    return out, err


def _world(tmp_path: Path, images: int = 20) -> Path:
    out = tmp_path / "world"
    _run(["world", "--images", str(images), "--seed", "3", "--out", str(out)])
    return out


def test_bars_forced_on_draw_rate_on_stderr_and_leave_stdout_to_the_result(tmp_path):
    r = _run(["embed", "--data", str(_world(tmp_path))], RAYSYS_PROGRESS="1")
    assert "embed" in r.stderr and any(rate in r.stderr for rate in BAR_RATE), r.stderr[-2000:]
    assert "\r" in r.stderr  # tqdm redraws in place
    assert not any(rate in r.stdout for rate in BAR_RATE)
    _last_json(r.stdout)


def test_a_terminal_gets_bars_and_ci_does_not():
    # a real process whose stderr is a pseudo-terminal: the rule as a user at a shell meets it
    loop = ["-c", "from raysys import progress\nfor _ in progress.track(range(3), desc='steps', unit='step'): pass\n"
                  "print('{}')"]  # fmt: skip
    out, err = _run_on_a_terminal(loop)
    assert "steps" in err and "3/3" in err and "step/s" in err, err
    assert out.strip() == "{}"
    out, err = _run_on_a_terminal(loop, CI="true")
    assert "steps" not in err and out.strip() == "{}", err


def test_no_bar_and_no_library_chatter_when_stderr_is_not_a_terminal(tmp_path):
    # stderr is a pipe here: no bar, and none of the start-up lines of faiss, Ray or transformers
    r = _run(["retrieve", "--data", str(_world(tmp_path)), "--k", "5"])
    err = r.stderr
    assert "\r" not in err and not any(rate in err for rate in BAR_RATE), err[-2000:]
    for chatter in ("Loading faiss", "faiss.loader", "Token authentication is enabled", "Loading weights"):
        assert chatter not in err, (chatter, err[-2000:])
    assert "\x1b[" not in err  # no colour codes in a log file
    assert "retrieved pairs shard 1/1" in err  # raysys's own log lines stay
    res = _last_json(r.stdout)
    assert res["k"] == 5 and res["images"] == 20


def test_the_rule_reads_the_terminal_ci_and_the_override(monkeypatch):
    monkeypatch.delenv("RAYSYS_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert progress.enabled()  # a real terminal
            monkeypatch.setenv("CI", "1")
            assert not progress.enabled()
            monkeypatch.setenv("RAYSYS_PROGRESS", "1")
            assert progress.enabled()
            monkeypatch.setenv("RAYSYS_PROGRESS", "0")
            monkeypatch.delenv("CI")
            assert not progress.enabled()
            monkeypatch.undo()
    finally:
        os.close(master)
    r_fd, w_fd = os.pipe()
    with os.fdopen(r_fd) as _, os.fdopen(w_fd, "w") as pipe:
        monkeypatch.delenv("RAYSYS_PROGRESS", raising=False)
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setattr(sys, "stderr", pipe)
        assert not progress.enabled()


def test_ray_data_bars_follow_the_rule(monkeypatch):
    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    for key in ("RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    try:
        monkeypatch.setenv("RAYSYS_PROGRESS", "1")
        progress.configure_ray()
        assert ctx.enable_progress_bars and ctx.enable_operator_progress_bars
        assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0"  # what Ray workers started next inherit
        monkeypatch.setenv("RAYSYS_PROGRESS", "0")
        progress.configure_ray()
        assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
        assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and os.environ["RAYSYS_PROGRESS"] == "0"
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = before


def test_track_completes_the_bar_and_stops_with_the_loop(monkeypatch, capsys):
    monkeypatch.setenv("RAYSYS_PROGRESS", "1")
    seen = list(progress.track(iter([[1, 2], [3]]), total=4, desc="rows", unit="row", weight=len))
    assert seen == [[1, 2], [3]]
    err = capsys.readouterr().err
    assert "rows" in err and "4/4" in err  # an estimated weight still ends at the total
    for _ in progress.track(range(10), desc="steps", unit="step"):
        break
    assert "0/10" in capsys.readouterr().err  # closed when the loop left early, not counted as done


def test_worker_noise_is_filtered_and_other_lines_kept():
    got: list[dict] = []
    handle = progress._without_noise(got.append)
    noisy = ("[2026-12-06 18:33:10,607 E 1 2] core_worker.cc:2465: Actor with class name: 'X' and ID: '0' "
             "has constructor arguments in the object store and max_restarts > 0. If the arguments ...")  # fmt: skip
    handle({"pid": 1, "lines": [noisy, "[raysys] step 1/10 loss=1.0"]})
    handle({"pid": 2, "lines": [noisy]})
    assert got == [{"pid": 1, "lines": ["[raysys] step 1/10 loss=1.0"]}]
