"""`raysys bench startup`: the bench's own logic (markers, timing of a subprocess, ratios).

No timing assertions: the speed target lives in the benchmark (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import os
import re
import sys

import pytest

from raysys.bench import startup
from raysys.commands.bench import BENCHES


def test_registered_with_a_help_line():
    assert BENCHES["startup"] == "raysys.bench.startup"
    p = argparse.ArgumentParser()
    startup.add_arguments(p)
    a = p.parse_args([])
    assert a.images == 300 and a.floor is None and set(a.commands.split(",")) == set(startup.COMMANDS)
    assert startup.__doc__.strip().splitlines()[0]


def test_first_marker_is_the_first_matching_line():
    lines = [(0.5, "INFO ray: Started a local Ray instance."), (3.0, "[raysys] step 10/10 epoch 0"),
             (1.25, "(RayTrainWorker) [raysys] step 1/10 epoch 0 lr=1.00e-04 loss=3.2"),
             (2.0, "[raysys] step 1/10 again")]  # fmt: skip
    lines.sort()
    assert startup.first_marker(lines, startup.MARKERS["pretrain"][1]) == 1.25
    assert startup.first_marker(lines, startup.MARKERS["retrieve"][1]) is None
    # "step 10/" must not pass for "step 1/"
    assert startup.first_marker([(1.0, "[raysys] step 10/10")], startup.MARKERS["pretrain"][1]) is None


def test_markers_match_the_lines_the_stages_log():
    """The patterns match the stages' real log lines (a renamed log line would silently break the bench)."""
    src = {
        "retrieve": "raysys/corpus/embedding.py",
        "phrases": "raysys/corpus/phrases.py",
        "pretrain": "raysys/pretrain/ray_train.py",
        "zeroshot": "raysys/evaluate/zeroshot.py",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, path in src.items():
        text = open(os.path.join(root, path), encoding="utf-8").read()
        # the marker's literal words, as they appear in the source's format string
        literal = startup.MARKERS[name][1].replace("\\[", "[").replace("\\]", "]")
        assert literal.replace("1/", "{") in text or literal in text, (name, literal)


def test_summarize_ratios_and_missing_marker():
    rows = startup.summarize({"retrieve": 30.0, "pretrain": 50.0, "zeroshot": None},
                             {"data": 15.0, "train": 20.0}, {"retrieve": 40.0, "pretrain": 60.0, "zeroshot": 1.0},
                             {"data": 16.0, "train": 25.0})  # fmt: skip
    assert rows["retrieve"] == {"first_step_s": 30.0, "floor": "data", "floor_s": 15.0, "ratio": 2.0, "within_2x": True,
                                "floor_total_s": 16.0, "wall_s": 40.0}  # fmt: skip
    assert rows["pretrain"]["ratio"] == 2.5 and rows["pretrain"]["within_2x"] is False
    assert rows["pretrain"]["floor"] == "train" and rows["pretrain"]["floor_s"] == 20.0
    assert rows["zeroshot"]["ratio"] is None and rows["zeroshot"]["within_2x"] is None


def test_run_timed_stamps_both_streams_in_order(tmp_path):
    code = ("import sys, time\nprint('out 1', flush=True)\ntime.sleep(0.3)\n"
            f"print({startup.FLOOR_MARK!r}, file=sys.stderr, flush=True)\nsys.exit(3)\n")  # fmt: skip
    r = startup.run_timed([sys.executable, "-c", code], dict(os.environ), str(tmp_path), timeout=60)
    assert r.rc == 3
    assert [line for _, line in r.lines] == ["out 1", startup.FLOOR_MARK]
    t_out, t_mark = (t for t, _ in r.lines)
    assert t_mark - t_out >= 0.25 and r.first(re.escape(startup.FLOOR_MARK)) == t_mark <= r.wall_s


def test_unknown_command_is_refused(tmp_path):
    p = argparse.ArgumentParser()
    startup.add_arguments(p)
    with pytest.raises(SystemExit, match="unknown"):
        startup.run(p.parse_args(["--commands", "retrieve,nope", "--work", str(tmp_path)]))
