"""Pre-training: Ray Train (1 worker) vs a plain single-process PyTorch loop, + 2-worker throughput.

Both sides run the *same* optimiser step (`raysys.pretrain.loop.Trainee.step`: the same model, seed,
batches, AdamW schedule, threads and precision) for the same number of steps in this run; only
the harness differs — a `for` loop in one plain process (a child in a session of its own, see
`plain_loop_in_own_session`), or Ray Train's `TorchTrainer` with one worker (its controller,
worker actor, `ray.train.report` checkpoints and MLflow logging from rank 0).

Per-step throughput is timed inside each loop after `--warmup` steps (the first steps pay for
allocator warm-up and, on CUDA, kernel selection), so Ray Train's fixed start-up (actor
scheduling, imports, data loading in the worker) is excluded from the ratio and reported apart as
`ray_startup_s`. `overhead_ms_per_step` is the difference of the mean step times. A 2-worker run
(DDP) reports its global samples/s. On CUDA the FLOPs of one step are counted with
`torch.utils.flop_counter` and `mfu` is the Ray run's achieved TFLOP/s over the device's bf16
dense peak (`--peak-tflops` for devices not in the table); on CPU both are null.

The default data is a generated demo world (2048-d features) trained with the R-T recipe, which
needs no retrieval; `--data DIR --recipe muvla` benches the full method on a prepared dataset
(e.g. `demo_out/data` after `raysys demo`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, most specific first.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]
TARGET_RATIO = 0.9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=200, help="optimiser steps on each side (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--data", default=None, help="dataset directory (default: a generated demo world)")
    p.add_argument("--images", type=int, default=600, help="images of the generated world (default 600)")
    p.add_argument("--recipe", default="rt", help="pre-training recipe (default rt: needs no retrieval)")
    p.add_argument("--model-path", default="", help="HF BERT folder (default: the packaged MiniLM)")
    p.add_argument("--model-layers", type=int, default=0, help="keep the first N layers (default: all)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs per Ray worker; on CPU also the torch threads of both sides (default 1)")  # fmt: skip
    p.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker run")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak for MFU (default: from a table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep data, checkpoints and MLflow store under this directory")


def _config(args: argparse.Namespace, work: Path, workers: int):
    from raysys.pretrain.config import TrainConfig

    return TrainConfig(
        recipe=args.recipe, batch_size=args.batch_size, steps=args.steps, steps_per_epoch=args.steps,
        model_path=args.model_path, model_layers=args.model_layers, seed=args.seed, workers=workers,
        cpus_per_worker=args.cpus_per_worker, threads=max(1, int(args.cpus_per_worker)),
        checkpoint_every=0, log_every=max(1, args.steps // 10), keep_checkpoints=1, max_failures=0,
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="raysys-bench-train",
    )  # fmt: skip


def plain_loop(cfg, data: Path, warmup: int) -> dict[str, Any]:
    """The baseline: the same steps in this process, no Ray."""
    import numpy as np
    import torch

    from raysys.pretrain.loop import make_trainee, pick_device, prepare
    from raysys.pretrain.ray_train import set_threads

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    set_threads(cfg, device)
    np.random.seed(cfg.seed)
    setup = prepare(cfg, data, 0, 1)
    tr = make_trainee(cfg, setup, device, {g: len(s) for g, s in setup.streams.items()})
    torch.manual_seed(cfg.seed)
    flops = None
    if device.type == "cuda":
        flops = _count_flops(tr, warmup)
    times, samples = [], []
    setup_s = time.perf_counter() - t0
    for s in range(tr.plan.total):
        t = time.perf_counter()
        _, _, n, _ = tr.step(s)  # its loss read-back synchronises CUDA once per step, as in the Ray loop
        times.append(time.perf_counter() - t)
        samples.append(n)
    return {"step_seconds": times, "step_samples": samples, "setup_seconds": setup_s, "flops_per_step": flops,
            "device": str(device)}  # fmt: skip


def plain_loop_in_own_session(cfg, data: Path, warmup: int) -> dict[str, Any]:
    """`plain_loop` in a child process that starts a session of its own. Why: Linux's autogroup
    scheduler shares the CPU between *sessions*; Ray's workers live in the session of the Ray node
    processes, so on a busy machine a loop left in the user's shell session gets a different share
    than the Ray worker and the ratio measures the machine's load, not Ray Train. (On a quiet
    machine both placements give the same times.)"""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=os.setsid) as ex:
        return ex.submit(plain_loop, cfg, data, warmup).result()


def _count_flops(tr, step: int) -> float:
    """FLOPs of one optimiser step (forward + backward; the w_ITM forward included), counted on a
    throw-away copy of the step so the timed run is unchanged."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.copy(tr)
    probe.module = copy.deepcopy(tr.module)
    probe.model = probe.module
    probe.optim = None  # forward/backward only: no parameter update on the copy
    rng = torch.cuda.get_rng_state_all(), torch.get_rng_state()
    with FlopCounterMode(display=False) as fc:
        _probe_step(probe, step)
    torch.cuda.set_rng_state_all(rng[0])
    torch.set_rng_state(rng[1])
    del probe
    return float(fc.get_total_flops())


def _probe_step(tr, s: int) -> None:
    from raysys.pretrain.granularities import to_device

    for a in range(tr.plan.grad_accum):
        batches = [to_device(tr.streams[g].batch(j), tr.device) for g, j in tr.mixer.at(s * tr.plan.grad_accum + a)]
        with tr.autocast():
            loss, _ = tr.step_fn(tr.model, batches, tr.plan.epoch(s))
        loss.backward()


def _throughput(step_seconds: list[float], step_samples: list[int], warmup: int, scale: float = 1.0):
    t = step_seconds[warmup:]
    n = step_samples[warmup : warmup + len(t)]
    if not t or sum(t) <= 0:
        return None, None
    return scale * sum(n) / sum(t), 1000.0 * statistics.fmean(t)


def _peak_tflops(override: float) -> tuple[float | None, str | None]:
    import torch

    if override > 0:
        return override, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    for frag, peak in BF16_PEAK_TFLOPS:
        if frag in name:
            return peak, name
    return None, name


def _ray_run(cfg, data: Path, storage: Path, name: str) -> dict[str, Any]:
    from ray.train import Checkpoint

    from raysys.pretrain.ray_train import fit, read_checkpoint_metrics

    t0 = time.perf_counter()
    res = fit(cfg, data, name, storage, log_model=False)
    wall = time.perf_counter() - t0
    with Checkpoint(res["checkpoint"]).as_directory() as d:
        m = read_checkpoint_metrics(d)
    m["fit_seconds"] = wall
    return m


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raysys.pretrain.ray_train import ensure_ray
    from raysys.rss import PeakRSS

    if args.warmup >= args.steps:
        from raysys.config import ConfigError

        raise ConfigError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="raysys-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    started = False
    try:
        with PeakRSS() as rss:
            data = Path(args.data) if args.data else work / "data"
            if not args.data and not (data / "manifest.json").exists():
                from raysys.data.world import WorldConfig, write_world

                write_world(WorldConfig(images=args.images, seed=args.seed), data)
            cfg1 = _config(args, work, 1)
            plain = plain_loop_in_own_session(cfg1, data, args.warmup)
            started = ensure_ray()
            tag = f"{int(time.time())}-{os.getpid()}"
            ray1 = _ray_run(cfg1, data, work / "storage", f"bench-1w-{tag}")
            ray2 = None
            if not args.no_two_workers:
                ray2 = _ray_run(_config(args, work, 2), data, work / "storage", f"bench-2w-{tag}")
        plain_sps, plain_ms = _throughput(plain["step_seconds"], plain["step_samples"], args.warmup)
        # identical batches on both sides: count the Ray side's samples with the plain loop's counts
        ray_sps, ray_ms = _throughput(ray1["step_seconds"], plain["step_samples"], args.warmup)
        two_sps = two_ms = None
        if ray2 is not None:
            two_sps, two_ms = _throughput(ray2["step_seconds"], ray2["step_samples"], args.warmup, ray2["world_size"])
        flops = plain["flops_per_step"]
        tflops = mfu = None
        peak, device_name = _peak_tflops(args.peak_tflops)
        if flops and ray_ms:
            tflops = flops / (ray_ms / 1000.0) / 1e12
            mfu = tflops / peak if peak else None
        ratio = ray_sps / plain_sps if (ray_sps and plain_sps) else None
        return {
            "bench": "train",
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "recipe": args.recipe,
            "model": args.model_path or "packaged MiniLM (all-MiniLM-L6-v2)",
            "model_layers": args.model_layers or "all",
            "device": plain["device"],
            "threads": cfg1.threads if plain["device"] == "cpu" else None,
            "plain_samples_per_s": _r(plain_sps),
            "ray_samples_per_s": _r(ray_sps),
            "ratio": _r(ratio, 3),
            "target_ratio": TARGET_RATIO,
            "meets_target": bool(ratio is not None and ratio >= TARGET_RATIO),
            "plain_step_ms": _r(plain_ms),
            "ray_step_ms": _r(ray_ms),
            "overhead_ms_per_step": _r(ray_ms - plain_ms) if (ray_ms and plain_ms) else None,
            "ray_fit_seconds": _r(ray1["fit_seconds"]),
            "ray_startup_s": _r(ray1["fit_seconds"] - sum(ray1["step_seconds"])),
            "ray_worker_setup_s": _r(ray1.get("setup_seconds")),
            "plain_setup_s": _r(plain["setup_seconds"]),
            "two_worker_samples_per_s": _r(two_sps),
            "two_worker_step_ms": _r(two_ms),
            "two_worker_scaling": _r(two_sps / ray_sps, 3) if (two_sps and ray_sps) else None,
            "gflop_per_step": _r(flops / 1e9) if flops else None,
            "tflops": _r(tflops, 3),
            "mfu": _r(mfu, 4),
            "peak_tflops": peak,
            "gpu": device_name,
            "cuda": torch.cuda.is_available(),
            "peak_rss_mb": rss.peak_mb,
        }
    finally:
        if started:
            import ray

            ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _r(x, nd: int = 2):
    return None if x is None else round(float(x), nd)
