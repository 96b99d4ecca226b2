"""Fixed start-up cost: time to the first step of pretrain / retrieve / phrases / zeroshot vs a same-run floor.

Small runs are dominated by what happens before the first step (starting Ray, importing models,
starting actors). Each command runs as a subprocess of the real CLI (`python -m raysys.cli …`,
the same as `raysys …`) on a fresh demo world made in a temp dir; the parent reads its stderr line
by line and timestamps the first line that marks the first step or first output:

* `retrieve` (K=5): the embedding stage's first batch reaching the driver;
* `phrases`: the phraser's first batch reaching the driver;
* `pretrain` (Ray Train, 1 worker, CPU, `--steps 10`, 2 layers, batch 8): the `step 1/` line;
* `evaluate zeroshot` (`max_images=20`, checkpoint `base`): the start of pair scoring.

The floors are measured in the same run, as subprocesses too (`python -m raysys.bench.startup
--floor data|train`): `ray.init` + one `map_batches` over a one-row dataset (floor of the
Ray Data stages and of zeroshot) and `ray.init` + a 1-worker CPU `TorchTrainer` whose loop
returns at once (floor of pretrain). A floor's time is taken at the same point as a command's:
its first batch at the driver / its loop entered; `floor_total_s` is the whole floor process.

The load average is printed, since the ratios, not the seconds, are what compare across runs.
The last line is JSON: per command `first_step_s`, `floor_s`, `ratio` (first_step_s / floor_s).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLOOR_MARK = "raysys-floor: first output"
# command -> (which floor, regex of its first-step line on stderr)
MARKERS: dict[str, tuple[str, str]] = {
    "retrieve": ("data", r"embedding: first batch"),
    "phrases": ("data", r"phrases: first batch"),
    "pretrain": ("train", r"\[raysys\] step 1/"),
    "zeroshot": ("data", r"zeroshot: scoring"),
}
COMMANDS = tuple(MARKERS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=300, help="images of the demo world (default 300)")
    p.add_argument("--commands", default=",".join(COMMANDS), help=f"which commands (default: {','.join(COMMANDS)})")
    p.add_argument("--repeats", type=int, default=1, help="runs of each floor and command; the minimum is kept")
    p.add_argument("--work", default="", help="working directory (default: a temp dir, removed afterwards)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a subprocess is killed")
    p.add_argument("--floor", choices=("data", "train"), default=None, help=argparse.SUPPRESS)  # internal


# ---------------------------------------------------------------- timing a subprocess


@dataclass
class Timed:
    """One subprocess run: its stderr/stdout lines with seconds since spawn, exit code, wall time."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    rc: int = 0
    wall_s: float = 0.0

    def first(self, pattern: str) -> float | None:
        return first_marker(self.lines, pattern)


def first_marker(lines: list[tuple[float, str]], pattern: str) -> float | None:
    """Seconds of the first line matching `pattern` (a regex searched in the line), else None."""
    rx = re.compile(pattern)
    for t, line in lines:
        if rx.search(line):
            return t
    return None


def run_timed(cmd: list[str], env: dict[str, str], cwd: str, timeout: float) -> Timed:
    """Run `cmd`; timestamp every output line (both streams) as it arrives, relative to the spawn."""
    out = Timed()
    lock = threading.Lock()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True, bufsize=1)

    def pump(stream) -> None:
        for line in stream:
            with lock:
                out.lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for th in threads:
        th.start()
    try:
        out.rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out.rc = proc.wait()
    for th in threads:
        th.join(timeout=10)
    out.wall_s = time.perf_counter() - t0
    out.lines.sort(key=lambda x: x[0])
    return out


# ---------------------------------------------------------------- the floors (run in a subprocess)


def _floor_data() -> None:
    import ray  # lazy: only the floor subprocess starts Ray

    from raysys.raycluster import ensure_ray

    ensure_ray()
    ds = ray.data.from_items([{"x": 0}]).map_batches(lambda b: b, batch_format="numpy")
    for _ in ds.iter_batches(batch_size=None):
        print(FLOOR_MARK, file=sys.stderr, flush=True)
    ray.shutdown()


def _floor_loop(config: dict[str, Any]) -> None:
    print(FLOOR_MARK, file=sys.stderr, flush=True)


def _floor_train(storage: str) -> None:
    import ray  # lazy: only the floor subprocess starts Ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysys.raycluster import ensure_ray

    ensure_ray(log_to_driver=True, object_store_mb=256)  # the Ray settings of `raysys pretrain` (ray_train.ensure_ray)
    TorchTrainer(_floor_loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                 run_config=RunConfig(name="floor", storage_path=storage)).fit()  # fmt: skip
    ray.shutdown()


# ---------------------------------------------------------------- the bench


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAYSYS_RAY_TMP", str(work / "ray"))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command_lines(world: Path, work: Path) -> dict[str, list[str]]:
    """The CLI invocation of each measured command."""
    cli = [sys.executable, "-m", "raysys.cli"]
    return {
        "retrieve": [*cli, "retrieve", "--data", str(world), "--k", "5"],
        "phrases": [*cli, "phrases", "--data", str(world)],
        "pretrain": [*cli, "pretrain", "--data", str(world), "--steps", "10", "--workers", "1",
                     "--storage", str(work / "runs"), "--name", "startup", "model_layers=2", "batch_size=8",
                     "log_every=1", "tracking_uri=none"],  # fmt: skip
        "zeroshot": [*cli, "evaluate", "zeroshot", "--checkpoint", "base", "--data", str(world),
                     "max_images=20", "mlflow=false"],  # fmt: skip
    }


def floor_line(kind: str, work: Path) -> list[str]:
    """A floor run; `work` must be new for each run (a Ray Train run of an existing name would resume)."""
    return [sys.executable, "-m", "raysys.bench.startup", "--floor", kind, "--work", str(work)]


def summarize(first: dict[str, float | None], floors: dict[str, float], walls: dict[str, float] | None = None,
              floor_totals: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per command: first_step_s, floor_s (of its floor kind), ratio, within_2x (None when the marker never came)."""
    out: dict[str, dict[str, Any]] = {}
    for name, t in first.items():
        kind = MARKERS[name][0]
        floor = floors[kind]
        ratio = round(t / floor, 2) if t is not None and floor > 0 else None
        row: dict[str, Any] = {"first_step_s": None if t is None else round(t, 2), "floor": kind,
                               "floor_s": round(floor, 2), "ratio": ratio,
                               "within_2x": None if ratio is None else ratio <= 2.0}  # fmt: skip
        if floor_totals:
            row["floor_total_s"] = round(floor_totals[kind], 2)
        if walls:
            row["wall_s"] = round(walls[name], 2)
        out[name] = row
    return out


def _measure(cmd: list[str], marker: str, env: dict[str, str], cwd: str, timeout: float, label: str) -> Timed:
    r = run_timed(cmd, env, cwd, timeout)
    t = r.first(marker)
    print(f"  {label}: first step {t if t is None else round(t, 2)} s, wall {r.wall_s:.1f} s, rc {r.rc}", flush=True)
    if r.rc != 0 or t is None:
        tail = "\n".join(line for _, line in r.lines[-30:])
        raise RuntimeError(f"bench startup: {label} failed (rc {r.rc}, marker {marker!r} seen: {t is not None}):\n{tail}")
    return r


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.floor:
        work = Path(args.work or tempfile.mkdtemp(prefix="raysys-floor-"))
        work.mkdir(parents=True, exist_ok=True)
        _floor_data() if args.floor == "data" else _floor_train(str(work / "runs"))
        return {"floor": args.floor}
    names = [c.strip() for c in args.commands.split(",") if c.strip()]
    bad = set(names) - set(COMMANDS)
    if bad:
        raise SystemExit(f"raysys bench startup: --commands: unknown {sorted(bad)}; use {list(COMMANDS)}")
    own = not args.work
    work = Path(args.work or tempfile.mkdtemp(prefix="raysys-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    env, cwd = _env(work), str(work)
    load0 = os.getloadavg()
    print(f"bench startup: load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    try:
        floors: dict[str, float] = {}
        floor_totals: dict[str, float] = {}
        first: dict[str, float | None] = {}
        walls: dict[str, float] = {}
        for rep in range(max(1, args.repeats)):  # floors and commands interleaved: a load spike hits both
            for kind in sorted({MARKERS[n][0] for n in names}):
                r = _measure(floor_line(kind, work / f"floor-{kind}-{rep}"), FLOOR_MARK, env, cwd, args.timeout, f"floor {kind}")
                floors[kind] = min(floors.get(kind, float("inf")), r.first(FLOOR_MARK) or 0.0)
                floor_totals[kind] = min(floor_totals.get(kind, float("inf")), r.wall_s)
            world = work / f"world-{rep}"
            shutil.rmtree(world, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "raysys.cli", "world", "--images", str(args.images), "--seed", "0",
                            "--out", str(world)], env=env, cwd=cwd, check=True, capture_output=True)  # fmt: skip
            cmds = command_lines(world, work / f"run-{rep}")
            for name in COMMANDS:  # in pipeline order: phrases needs pairs, pretrain needs both
                if name not in names and not (name in ("retrieve", "phrases") and "pretrain" in names):
                    continue
                r = _measure(cmds[name], MARKERS[name][1], env, cwd, args.timeout, name)
                if name in names:
                    t = r.first(MARKERS[name][1])
                    first[name] = t if first.get(name) is None else min(first[name], t)
                    walls[name] = r.wall_s if name not in walls else min(walls[name], r.wall_s)
        load1 = os.getloadavg()
        rows = summarize({n: first[n] for n in names}, floors, walls, floor_totals)
        print(f"{'command':<10} {'first_step_s':>12} {'floor':>6} {'floor_s':>8} {'ratio':>6} {'wall_s':>7}")
        for n, r in rows.items():
            print(f"{n:<10} {r['first_step_s']:>12} {r['floor']:>6} {r['floor_s']:>8} {r['ratio']:>6} {r['wall_s']:>7}")
        print(f"bench startup: load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}", flush=True)
        return {"bench": "startup", "images": args.images, "repeats": max(1, args.repeats),
                "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
                "cpus": os.cpu_count(), "all_within_2x": all(r["within_2x"] for r in rows.values()),
                **rows}  # fmt: skip
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m raysys.bench.startup` (the floors run this way)."""
    import json

    p = argparse.ArgumentParser(prog="raysys.bench.startup")
    add_arguments(p)
    print(json.dumps(run(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
