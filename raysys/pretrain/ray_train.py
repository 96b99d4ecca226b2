"""Distributed pre-training on Ray Train (Train V2): `TorchTrainer` over N CPU or GPU workers.

The per-step work is the plain-PyTorch core of `raysys.pretrain.loop` unchanged (`prepare`, then
`make_trainee` and its `Trainee.step`, the very step `train_local` runs); this module adds what a
cluster run needs:

- **DDP**: `ray.train.torch.prepare_model`; each worker loads only its shard of the data
  (`prepare(cfg, data, rank, world_size)` reads the Parquet shards and keeps rank's images). The
  ranks agree on the batch counts (all-reduce MIN) so every rank runs the same granularity at the
  same step, which DDP's collectives require.
- **Optimisation**: AdamW, linear warm-up then linear decay, gradient accumulation over
  `grad_accum` micro-batches (DDP `no_sync` on all but the last). Effective batch =
  `batch_size × workers × grad_accum` (the paper's 480 = e.g. 60 × 4 × 2). On CUDA: bf16
  autocast and optional `torch.compile` of the encoder; on CPU: float32 with torch's thread count
  set to the worker's CPUs (Ray gives a worker 1 CPU by default; more threads than CPUs only
  oversubscribe the cores).
- **Checkpoints** every `checkpoint_every` steps and at every epoch end through
  `ray.train.report(metrics, checkpoint=…)`. A checkpoint directory holds
  `model.pt` (`raysys.pretrain.model.save_checkpoint` format: loads with `load_checkpoint`/`raysys export`),
  `train_state.pt` (optimiser, scheduler, step, epoch), `rng-rank<r>.pt` (each rank's torch /
  CUDA / numpy / python RNG: dropout differs per rank), `metrics.json` and `config.yaml`. Every
  `.pt` is tensors and plain containers only and is read back with `torch.load(weights_only=True)`:
  a checkpoint never runs code, and a tampered pickle is refused.
- **Resume**: Train V2 restores a run from its storage when a run with the same
  `RunConfig(name, storage_path)` is started again; the loop then continues from
  `ray.train.get_checkpoint()` at the exact step, with the same batches (a pure function of seed,
  rank and step) and the same RNG states, so a stopped-and-resumed run equals an uninterrupted one.
  `FailureConfig(max_failures)` restarts the worker group from the latest checkpoint when a worker
  dies.
- **MLflow**: the driver creates (or, on resume, reopens) one run holding the resolved config as
  params; rank 0 logs every loss component per step, learning rate, the mean `w_ITM`,
  samples/s and tokens/s (all ranks); the driver adds the config and the final model as
  artifacts.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch.nn.parallel import DistributedDataParallel as DDP

from raysys import config as rconfig
from raysys import progress, tracking
from raysys.checkpoints import load_weights
from raysys.config import ConfigError
from raysys.contract import ContractError
from raysys.plugins import load_plugins
from raysys.pretrain.config import TrainConfig
from raysys.pretrain.optim import Optimizer
from raysys.pretrain.recipes import resolve
from raysys.pretrain.rendezvous import LoopbackTorchConfig
from raysys.pretrain.stream import (
    StreamFeed,
    StreamPlan,
    dataset_name,
    plan_from_json,
    plan_json,
    rank_items,
    ray_rows,
    total_micro,
)
from raysys.pretrain.stream import dataset as stream_dataset
from raysys.pretrain.stream import plan as stream_plan
from raysys.raycluster import ensure_ray as _ensure_ray
from raysys.rss import PeakRSS
from raysys.tracking import MetricBuffer

if TYPE_CHECKING:
    from raysys.pretrain.loop import Trainee

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "raysys.trainstate/1"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


def validate(cfg: TrainConfig) -> None:
    """Fail in the driver, in one line, on what would otherwise fail inside every worker."""
    for key in ("workers", "grad_accum", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: {getattr(cfg, key)} must be ≥ 1")
    for key in ("checkpoint_every", "stop_after_epochs", "fail_at_step", "max_failures", "steps", "steps_per_epoch"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: {getattr(cfg, key)} must be ≥ 0")
    if cfg.cpus_per_worker <= 0:
        raise ConfigError(f"cpus_per_worker: {cfg.cpus_per_worker} must be > 0")
    resolve(cfg)  # unknown recipe / granularities


def demo_config() -> TrainConfig:
    """The brief 2-worker run of `raysys demo` (also `configs/pretrain_demo.yaml`)."""
    return TrainConfig(**DEMO)


# 2 epochs of 75 joint steps (R-T + R-P + I-S in every step): the w_ITM curriculum (m = 1) acts in
# the second. Two settings make the alignment learnable on 2 CPU cores in ~4 minutes; both are
# measured in docs/pretraining.md ("Learning the alignment on a CPU budget"):
# region_init=tags starts the visual projection at the detector tags' word embeddings, and
# loss_weights.itm=10 gives ITM a voice against the MLM/MRC gradients that fill AdamW's moments.
DEMO: dict[str, Any] = {
    "workers": 2,
    "model_layers": 2,
    "batch_size": 16,
    "mixing": "joint",
    "steps_per_epoch": 75,
    "epochs": 2,
    "checkpoint_every": 50,
    "log_every": 10,
    "lr": 3e-4,
    "region_init": "tags",
    "loss_weights": {"itm": 10.0},
}


# ---------------------------------------------------------------- checkpoint files


def _rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "python": {"version": int(version), "state": torch.tensor(pystate, dtype=torch.int64),
                   "gauss": gauss},  # fmt: skip
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)` (`raysys.checkpoints.load_weights`): tensors and plain
    containers only. Anything else is refused with a one-line error, never executed."""
    return load_weights(path)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def write_checkpoint_files(
    directory: Path, rank: int, module, optim: Optimizer | None, state: dict[str, Any], metrics: dict[str, Any],
    cfg: TrainConfig,
) -> None:  # fmt: skip
    """Rank 0 writes the shared files (model, optimiser, scheduler, metrics, config); every rank
    writes its RNG state. Ray Train merges the ranks' directories into one checkpoint."""
    from raysys.pretrain.model import save_checkpoint  # lazy: transformers; only workers need it

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / rng_file(rank))
    if rank != 0:
        return
    extra = {"recipe": cfg.recipe, "steps": state["step"], "epoch": state["epoch"], "pretrain_config": rconfig.to_dict(cfg),
             "mlflow_run_id": metrics.get("mlflow_run_id"), "tracking_uri": metrics.get("tracking_uri")}  # fmt: skip
    save_checkpoint(directory / MODEL_FILE, module, extra)
    payload = {
        "format": TRAIN_STATE_FORMAT,
        **state,
        "optimizer": optim.opt.state_dict() if optim is not None else {},
        "scheduler": optim.sched.state_dict() if optim is not None else {},
    }
    torch.save(payload, directory / STATE_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics))
    (directory / CONFIG_FILE).write_text(rconfig.dump(cfg))


def restore_checkpoint(directory: Path, tr: Trainee, rank: int, world: int, seed: int) -> dict[str, Any]:
    """Load a checkpoint into this rank's trainee (model, optimiser, scheduler, RNG); returns its
    train state. With another worker count the RNG streams cannot be restored: the rank reseeds
    (the run continues, but not bit-for-bit)."""
    from raysys.pretrain.model import CHECKPOINT_FORMAT  # lazy: transformers; only workers need it

    payload = safe_load(directory / MODEL_FILE)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ContractError(directory / MODEL_FILE, None, "format", "not a raysys model checkpoint")
    tr.module.load_state_dict(payload["state_dict"])
    state = load_train_state(directory)
    if tr.optim is not None and state["optimizer"]:
        tr.optim.load_state_dict({"opt": state["optimizer"], "sched": state["scheduler"]})
    rng = directory / rng_file(rank)
    if rng.exists() and state.get("world_size") == world:
        _set_rng_state(safe_load(rng))
    else:
        torch.manual_seed(seed + 1_000_003 * rank + state["step"])
    return state


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ContractError(path, None, "format", f"not a raysys training state ({state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state


def read_checkpoint_metrics(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / METRICS_FILE
    return json.loads(p.read_text()) if p.exists() else {}


# ---------------------------------------------------------------- the worker loop


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


def _say(msg: str) -> None:
    """Progress lines from rank 0 go to stderr: Ray forwards worker stderr to the driver's
    stderr, so the driver's stdout keeps only the final JSON line."""
    print(msg, file=sys.stderr, flush=True)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer broadcast: the model's buffers (position ids)
    never change, so the broadcast would be one collective per forward for nothing. torch ≥ 2.13
    renamed the flag (`broadcast_buffers` → `forward_sync_buffers`)."""
    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _every_parameter_in_the_graph(model):
    """Wrap a `VLModel` so that every parameter takes part in every backward pass.

    DDP (without `find_unused_parameters`) all-reduces gradient buckets as their parameters'
    gradients arrive; a parameter that gets no gradient on one rank leaves that rank's bucket
    unready and the ranks' collectives out of step (gloo then fails with "Received data size
    doesn't match"). The model's `aux_zero` already touches every head; but a batch in which no
    objective has a target (a small R-P batch where no link was masked, an R-T batch with nothing
    masked) leaves the *encoder* out of the loss. Adding `0 · sum(hidden states)` to `aux_zero`
    keeps it in, at the cost of nothing the backward pass was not already doing."""

    class EveryParameter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            out = self.inner(batch)
            if torch.is_grad_enabled():
                out["aux_zero"] = out["aux_zero"] + (out["text_hidden"].sum() + out["region_hidden"].sum()) * 0.0
            return out

    return EveryParameter(model)


def _failure_drill(rank: int, step: int, invocation: str) -> None:
    """`fail_at_step`: this worker process dies by SIGKILL, once per `fit()` invocation, so that
    `FailureConfig` recovery can be exercised on any cluster (docs/training.md).

    Once: a marker file in the run's storage (any filesystem Ray Train writes to) records that the
    drill fired; the restarted worker group passes the step without dying again. Before dying the
    worker waits until the controller has taken its last report: a report sits in the worker's
    queue until the controller's next poll, and a worker that dies first takes it along (the run
    would then restart from the checkpoint before it — correct, but not what a drill should show).
    """
    try:
        storage = ray.train.get_context().get_storage()
        fs, marker = storage.storage_filesystem, f"{storage.experiment_fs_path}/.failure-drill-{invocation}"
        if fs.get_file_info(marker).type != pafs.FileType.NotFound:
            return
        with fs.open_output_stream(marker) as f:
            f.write(f"rank {rank} pid {os.getpid()} step {step}\n".encode())
    except Exception as e:  # noqa: BLE001 - a drill that cannot record itself must not fire (it would loop)
        _say(f"[raysys] failure drill skipped: cannot write its marker ({e})")
        return
    try:  # Ray Train internals (2.60): the worker's report queue; best effort, bounded wait
        from ray.train.v2._internal.execution.context import get_train_context  # lazy: internals may move

        q = get_train_context().get_result_queue()
        deadline = time.monotonic() + 30
        while q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001
        pass
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) * 2)
    _say(f"[raysys] failure drill: rank {rank} kills its own process (pid {os.getpid()}) at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def set_threads(cfg: TrainConfig, device) -> None:
    """CPU: torch's intra-op threads = the CPUs the worker holds (Ray sets OMP_NUM_THREADS to
    them too); more threads than cores only contend."""
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))


def _worker_trainee(cfg: TrainConfig, config: dict[str, Any], rank: int, world: int, device: torch.device) -> Trainee:
    """This rank's trainee, its model placed by Ray Train (DDP when world > 1). `input=stream`:
    its steps come from its Ray Data dataset (`ray.train.get_dataset_shard`). `input=memory`: its
    shard of the corpus, with a mixer every rank agrees on (batch counts all-reduced with MIN)."""
    from raysys.pretrain.loop import (  # lazy: transformers
        make_trainee,
        prepare,
        prepare_stream,
        stream_run_plan,
    )

    def wrap(m):
        m = _every_parameter_in_the_graph(m) if world > 1 else m
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs=_no_buffer_sync())

    if cfg.input == "stream":
        setup, sp = prepare_stream(cfg, config["data"], world, plan_from_json(config["stream_plan"]))
        feed = StreamFeed(ray_rows(ray.train.get_dataset_shard(dataset_name(rank)), cfg.prefetch_steps))
        return make_trainee(cfg, setup, device, {}, wrap, plan=stream_run_plan(cfg, sp), feed=feed)
    setup = prepare(cfg, config["data"], rank, world)
    names = list(setup.recipe.granularities)
    local = [float(len(setup.streams[g])) for g in names]
    agreed = {g: int(x) for g, x in zip(names, _all_reduce(local, device, op="min"))}
    return make_trainee(cfg, setup, device, agreed, wrap)


@dataclass
class _Attempt:
    """One worker's attempt at the run (from its start or a checkpoint): what the steps carry to
    the logs, metrics and checkpoints."""

    cfg: TrainConfig
    tr: Trainee
    rank: int
    world: int
    invocation: str  # this fit() call; a restart after a failure keeps it
    mlflow_run_id: str | None
    tracking_uri: str | None
    start: int = 0
    restored_from: int | None = None
    invocation_start: int = 0  # the step this fit() call started at (for stop_after_epochs)
    setup_s: float = 0.0
    step_times: list[float] = field(default_factory=list)  # rank 0's wall time per step (without checkpoint writes)
    step_samples: list[int] = field(default_factory=list)  # this rank's samples per step
    loss_global: float = float("nan")
    samples: int = 0  # since the last log step (this rank)
    tokens: int = 0
    total_samples: int = 0  # this attempt, all ranks
    total_tokens: int = 0
    t_log: float = 0.0
    t_loop: float = 0.0
    rss: PeakRSS | None = None
    last: dict[str, float] = field(default_factory=dict)  # every component's latest value (all granularities)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body each Ray Train worker runs (one DDP rank)."""
    load_plugins()  # RAYSYS_PLUGINS (inherited from the driver): plugin objectives exist here too
    with PeakRSS(interval=0.5) as rss:  # this worker's resident memory, sampled (metrics: peak_rss_mb_per_worker)
        _train(config, rss)


def _train(config: dict[str, Any], rss: PeakRSS) -> None:
    t_setup = time.perf_counter()
    cfg = rconfig.from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    set_threads(cfg, device)
    np.random.seed(cfg.seed)
    tr = _worker_trainee(cfg, config, rank, world, device)
    # Dropout stream: rank 0 matches the local loop's; other ranks get their own.
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    run = _Attempt(cfg, tr, rank, world, config["invocation"], config.get("mlflow_run_id"), config.get("tracking_uri"), rss=rss)
    _resume(run)
    metrics_buf = None
    if rank == 0 and run.tracking_uri and run.mlflow_run_id:
        metrics_buf = MetricBuffer(run.tracking_uri, run.mlflow_run_id)
    run.setup_s = time.perf_counter() - t_setup
    run.t_log = run.t_loop = time.perf_counter()
    steps = range(run.start, tr.plan.total)
    for s in progress.track(steps, desc="pretrain", unit="step", initial=run.start, on=rank == 0):
        if _train_step(run, s, metrics_buf):
            break
    if metrics_buf is not None:
        metrics_buf.flush()


def _resume(run: _Attempt) -> None:
    """Continue from `ray.train.get_checkpoint()` when Ray Train has one (a re-run or a restart)."""
    invocation_start = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore_checkpoint(Path(d), run.tr, run.rank, run.world, run.cfg.seed)
        run.start = run.restored_from = int(state["step"])
        if state.get("invocation") == run.invocation:  # a restart after a failure within this fit()
            invocation_start = state.get("invocation_start")
        if run.rank == 0:
            _say(f"[raysys] resuming at step {run.start}/{run.tr.plan.total} (epoch {run.tr.plan.epoch(run.start)})")
    run.invocation_start = run.start if invocation_start is None else invocation_start


def _train_step(run: _Attempt, s: int, metrics_buf: MetricBuffer | None) -> bool:
    """Step `s`, its log line and metrics, and a checkpoint when one is due; True: stop here."""
    cfg, plan = run.cfg, run.tr.plan
    t_step = time.perf_counter()
    epoch = plan.epoch(s)
    if cfg.fail_at_step and s == cfg.fail_at_step and run.rank == run.world - 1:
        _failure_drill(run.rank, s, run.invocation)
    comps, lr, n_samples, n_tokens = run.tr.step(s)
    run.last.update(comps)
    run.samples += n_samples
    run.tokens += n_tokens
    run.step_samples.append(n_samples)
    steps_done = s + 1
    end_of_epoch = steps_done % plan.per_epoch == 0
    last = steps_done == plan.total
    checkpoint_now = last or end_of_epoch or (cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0)
    w = [v for k, v in comps.items() if k.endswith(".w_itm")]
    row = {**comps, "lr": lr, "epoch": float(epoch)}
    if w:
        row["w_itm"] = sum(w) / len(w)
    if checkpoint_now or (cfg.log_every and s % cfg.log_every == 0):
        row.update(_log_progress(run, comps, lr, steps_done, epoch))
    if metrics_buf is not None:
        metrics_buf.add(row, s)
    if not checkpoint_now:
        run.step_times.append(time.perf_counter() - t_step)
        return False
    epochs_done = plan.epochs_done(steps_done)
    stop = bool(cfg.stop_after_epochs and end_of_epoch and not last
                and epochs_done - plan.epoch(run.invocation_start) >= cfg.stop_after_epochs)  # fmt: skip
    run.step_times.append(time.perf_counter() - t_step)  # before the checkpoint is written
    metrics = _metrics(run, steps_done, epoch, comps, lr, last, stop)
    if metrics_buf is not None:
        metrics_buf.flush()  # what MLflow shows never runs ahead of the checkpoint
    _checkpoint(run, metrics)
    if stop and run.rank == 0:
        _say(f"[raysys] stopping after epoch {epoch} (stop_after_epochs={cfg.stop_after_epochs}); "
             "re-run with the same name to continue")  # fmt: skip
    return stop


def _log_progress(run: _Attempt, comps: dict[str, float], lr: float, steps_done: int, epoch: int) -> dict[str, float]:
    """A log step: one small all-reduce (the mean loss and the global sample/token counts), rank
    0's progress line; returns the throughput figures of the row."""
    loss_sum, n_s, n_t = _all_reduce([comps["loss"], float(run.samples), float(run.tokens)], run.tr.device)
    run.loss_global = loss_sum / run.world
    now = time.perf_counter()
    dt = max(now - run.t_log, 1e-9)
    figures = {"loss_all_ranks": run.loss_global, "samples_per_s": n_s / dt, "tokens_per_s": n_t / dt}
    run.total_samples += int(n_s)
    run.total_tokens += int(n_t)
    run.samples = run.tokens = 0
    run.t_log = now
    if run.rank == 0:
        parts_txt = " ".join(f"{k}={v:.4f}" for k, v in comps.items())
        _say(f"[raysys] step {steps_done}/{run.tr.plan.total} epoch {epoch} lr={lr:.2e} {parts_txt} "
             f"samples/s={figures['samples_per_s']:.1f}")  # fmt: skip
    return figures


def _metrics(
    run: _Attempt, steps_done: int, epoch: int, comps: dict[str, float], lr: float, last: bool, stop: bool
) -> dict[str, Any]:
    """What a checkpoint's metrics.json holds (and, in part, what Ray Train and Tune see)."""
    plan = run.tr.plan
    loop_s = time.perf_counter() - run.t_loop
    feed = run.tr.feed
    mine = (run.rss.peak_mb if run.rss else 0.0, (feed.wait_s if feed else 0.0) / max(loop_s, 1e-9),
            float(feed.rows_read if feed else -1))  # fmt: skip
    per_rank = _all_reduce([x for r in range(run.world) for x in (mine if r == run.rank else (0.0, 0.0, 0.0))],
                           run.tr.device)  # fmt: skip
    return {
        "step": steps_done,
        "epoch": epoch,
        "epochs": plan.epochs_done(steps_done),
        "total_steps": plan.total,
        "steps_per_epoch": plan.per_epoch,
        "complete": last,
        "stopped": stop,
        "final_loss": run.loss_global,
        "loss": comps["loss"],
        "components": {k: v for k, v in run.last.items() if k != "loss"},  # each one's last value
        "lr": lr,
        "world_size": run.world,
        "grad_accum": plan.grad_accum,
        "global_batch": run.cfg.batch_size * run.world * plan.grad_accum,
        "resumed_from_step": run.restored_from,
        "attempt_start_step": run.start,
        "setup_seconds": run.setup_s,
        "loop_seconds": loop_s,
        "samples": run.total_samples,
        "tokens": run.total_tokens,
        "samples_per_s": run.total_samples / loop_s if loop_s > 0 else None,
        "tokens_per_s": run.total_tokens / loop_s if loop_s > 0 else None,
        "step_seconds": run.step_times,
        "step_samples": run.step_samples,
        "device": str(run.tr.device),
        "input": run.cfg.input,
        "peak_rss_mb_per_worker": per_rank[0::3],
        "data_wait_share_per_worker": per_rank[1::3],
        "examples_rows_read_per_worker": [int(x) for x in per_rank[2::3]],  # stream: rows its windows held
        "mlflow_run_id": run.mlflow_run_id,
        "tracking_uri": run.tracking_uri,
    }


def _checkpoint(run: _Attempt, metrics: dict[str, Any]) -> None:
    """Write this rank's part of the checkpoint and hand it to `ray.train.report`."""
    plan, steps_done = run.tr.plan, metrics["step"]
    state = {"step": steps_done, "epoch": metrics["epoch"], "total_steps": plan.total, "per_epoch": plan.per_epoch,
             "world_size": run.world, "invocation": run.invocation, "invocation_start": run.invocation_start}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
        write_checkpoint_files(Path(tmp), run.rank, run.tr.module, run.tr.optim, state, metrics, run.cfg)
        # what Ray Train (and Tune, through TuneReportCallback) sees; the rest is in metrics.json
        keep = ("step", "epoch", "epochs", "complete", "stopped", "final_loss", "loss", "lr",
                "samples_per_s", "tokens_per_s", "world_size", "resumed_from_step")  # fmt: skip
        report = {k: metrics[k] for k in keep}
        report.update({f"c.{k}": v for k, v in metrics["components"].items()})
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{steps_done:08d}")  # fmt: skip


# ---------------------------------------------------------------- the driver


def resolve_storage(storage: str | os.PathLike) -> str:
    """A URI (s3://, gs://, …) is passed through to RunConfig; a local path is made absolute
    (Ray Train requires it) and created."""
    s = str(storage)
    if "://" in s:
        return s
    p = Path(s).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


def run_exists(storage: str, name: str) -> bool:
    """Whether Ray Train has state for this run (what makes a re-run resume)."""
    try:
        from ray.train.v2._internal.constants import (  # lazy: Ray 2.60 internals, may move
            CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
        )

        fs, base = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
        info = fs.get_file_info(f"{base.rstrip('/')}/{name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}")
        return info.type != pafs.FileType.NotFound
    except Exception:  # noqa: BLE001 - unknown: let the MLflow link decide
        return True


def checkpoint_uri(ckpt) -> str:
    """A checkpoint's location as a path (local storage) or URI (remote storage)."""
    fs = getattr(ckpt, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    if kind in ("local", None):
        return str(ckpt.path)
    return f"{kind}://{str(ckpt.path).lstrip('/')}" if kind != "gcs" else f"gs://{str(ckpt.path).lstrip('/')}"


def ensure_ray(num_cpus: int | None = None) -> bool:
    """`raysys.raycluster.ensure_ray`, with the workers' stderr (training progress) reaching this
    process. True when this call started Ray."""
    return _ensure_ray(num_cpus, log_to_driver=True, object_store_mb=256)


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def fit(
    cfg: TrainConfig,
    data: str | os.PathLike,
    name: str,
    storage: str | os.PathLike,
    *,
    tracking_base: str | os.PathLike | None = None,
    log_model: bool = True,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Run (or resume) pre-training `name` under `storage`; returns the summary the CLI prints.

    `tracking_base` is where the default sqlite MLflow store goes when `cfg.tracking_uri` is ""
    (default: the storage directory when it is local). `callbacks` go to `RunConfig(callbacks=…)`.
    """
    validate(cfg)
    if not name or "/" in name:
        raise ConfigError(f"name: {name!r} must be a non-empty name without '/'")
    data = Path(data).expanduser().resolve()
    if not (data / "manifest.json").exists():
        raise ContractError(data / "manifest.json", None, "manifest", "no dataset here (manifest.json missing)")
    storage = resolve_storage(storage)
    t0 = time.perf_counter()
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri, tracking_base if tracking_base is not None else storage)
    run_id = _start_tracking(cfg, uri, data, name, storage)
    trainer = _trainer(cfg, data, name, storage, uri, run_id, callbacks, _stream_inputs(cfg, data, name, storage))
    try:
        result = trainer.fit()
    except BaseException:
        if uri and run_id:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"run {name}: training ended without a checkpoint")
    metrics = _finish_tracking(ckpt, result, uri, run_id, log_model)
    return {
        "name": name,
        "storage": storage,
        "final_loss": metrics.get("final_loss"),
        "steps": metrics.get("step"),
        "total_steps": metrics.get("total_steps"),
        "epochs": metrics.get("epochs"),
        "complete": bool(metrics.get("complete")),
        "checkpoint": checkpoint_uri(ckpt),
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "experiment": cfg.experiment if uri else None,
        "workers": metrics.get("world_size", cfg.workers),
        "global_batch": metrics.get("global_batch"),
        "resumed_from_step": metrics.get("resumed_from_step"),
        "recipe": cfg.recipe,
        "components": metrics.get("components", {}),
        "samples_per_s": metrics.get("samples_per_s"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "device": metrics.get("device"),
        "input": cfg.input,
        "peak_rss_mb_per_worker": metrics.get("peak_rss_mb_per_worker"),
        "data_wait_share_per_worker": metrics.get("data_wait_share_per_worker"),
        "examples_rows_read_per_worker": metrics.get("examples_rows_read_per_worker"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _stream_inputs(cfg: TrainConfig, data: Path, name: str, storage: str) -> tuple[StreamPlan, dict[str, Any]] | None:
    """`input=stream`: the window plan and one Ray Data dataset per rank, each from the step the
    run resumes at (the latest checkpoint Ray Train will restore, when there is one), so a
    resumed run re-reads one window, not the epoch."""
    if cfg.input != "stream":
        return None
    ray.data.DataContext.get_current().enable_progress_bars = progress.enabled()  # the one rule: raysys.progress
    sp = stream_plan(data, cfg, resolve(cfg), cfg.workers)
    start, end = resume_step(storage, name) * sp.grad_accum, total_micro(sp, cfg)
    dcfg = dataclasses.replace(cfg, data_cpus=_data_cpus(cfg))
    return sp, {dataset_name(r): stream_dataset(sp, dcfg, rank_items(sp, cfg.seed, r, end, start))
                for r in range(cfg.workers)}  # fmt: skip


def data_cpus_that_fit(cpus: float, cfg: TrainConfig, runs: int = 1) -> float:
    """`data_cpus`, or what `cpus` leave beside the training workers of `runs` runs at once when that
    is less (a 2-core machine running 2 workers of 1 CPU has none left: the actors then reserve 0
    CPUs and share the cores, as the in-memory path's collation did inside the workers). A sweep
    passes its concurrent trials: two trials of one 1-CPU worker on 2 CPUs reserving 0.5 each for
    their readers hung in Ray Data ("the job may hang forever")."""
    free = cpus - runs * cfg.workers * cfg.cpus_per_worker
    return min(cfg.data_cpus, max(0.0, free / max(1, runs * cfg.workers * cfg.data_actors)))


def _data_cpus(cfg: TrainConfig) -> float:
    fit = data_cpus_that_fit(ray.cluster_resources().get("CPU", 0.0), cfg)
    if fit < cfg.data_cpus:
        log.info("data_cpus=%s does not fit beside the training workers: using %.2f", cfg.data_cpus, fit)
    return fit


def resume_step(storage: str, name: str) -> int:
    """The step of the checkpoint Ray Train restores when run `name` starts again (its checkpoint
    manager snapshot's latest checkpoint, `checkpoint-<step>`); 0 when there is none."""
    try:
        from ray.train.v2._internal.constants import (  # lazy: Ray 2.60 internals, may move
            CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
        )

        fs, base = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
        with fs.open_input_stream(f"{base.rstrip('/')}/{name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}") as f:
            snap = json.loads(f.read().decode())
        latest = snap.get("latest_checkpoint_result") or {}
        found = re.search(r"checkpoint-(\d+)", json.dumps(latest))
        return int(found.group(1)) if found else 0
    except Exception:  # noqa: BLE001 - no snapshot (a new run) or another Ray: start at 0, workers skip
        return 0


def _start_tracking(cfg: TrainConfig, uri: str | None, data: Path, name: str, storage: str) -> str | None:
    """Create (or, on resume, reopen) the run's MLflow run: the resolved config as params (a
    tracking URI's password redacted), source tags (commit, dirty flag, command line) and the
    dataset as an input."""
    if not uri:
        return None
    params = {**rconfig.to_dict(cfg), "data": str(data), "storage": storage, "name": name}
    params["tracking_uri"] = tracking.redact(str(params.get("tracking_uri", "")))
    run_id, reopened = tracking.start_run(
        uri, cfg.experiment, run_name=name, link=f"{storage.rstrip('/')}/{name}", params=params,
        tags={"raysys.stage": "pretrain", "raysys.storage": storage, "raysys.name": name, **tracking.source_tags()},
        reopen=run_exists(storage, name),  # a fresh storage dir is a new run, even if MLflow knew the name
    )  # fmt: skip
    if not reopened:
        tracking.log_dataset(uri, run_id, data)
    log.info("%s%s", tracking.describe(uri, run_id, cfg.experiment), " (reopened)" if reopened else "")
    return run_id


def _trainer(
    cfg: TrainConfig, data: Path, name: str, storage: str, uri: str | None, run_id: str | None, callbacks: list | None,
    stream: tuple[StreamPlan, dict[str, Any]] | None = None,
) -> TorchTrainer:  # fmt: skip
    extra: dict[str, Any] = {}
    if stream is not None:  # each rank reads its own dataset, in order: never split, order kept
        extra["datasets"] = stream[1]
        extra["dataset_config"] = ray.train.DataConfig(
            datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": rconfig.to_dict(cfg),
            "data": str(data),
            "invocation": uuid.uuid4().hex,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "stream_plan": plan_json(stream[0]) if stream is not None else None,
        },
        **extra,
        torch_config=LoopbackTorchConfig(),  # the rendezvous binds 127.0.0.1 when the group is on one node
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=_use_gpu(cfg), resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=callbacks or None,  # e.g. TuneReportCallback() when a Tune trial runs this fit
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.keep_checkpoints)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def _finish_tracking(ckpt, result, uri: str | None, run_id: str | None, log_model: bool) -> dict[str, Any]:
    """The final checkpoint's metrics; MLflow gets its location, the complete flag and (when
    complete and `log_model`) the config and model as artifacts, and the run is ended."""
    with ckpt.as_directory() as d:
        metrics = read_checkpoint_metrics(d) or dict(result.metrics or {})
        complete = bool(metrics.get("complete"))
        if uri and run_id:
            tracking.log_tags(uri, run_id, {"raysys.complete": str(complete).lower(),
                                             "raysys.checkpoint": checkpoint_uri(ckpt)})  # fmt: skip
            if complete:
                tracking.log_artifacts(uri, run_id, [Path(d) / CONFIG_FILE])
                tracking.log_loss_curve(uri, run_id, ["loss", "loss_all_ranks"])
            if complete and log_model:  # an MLflow logged model holding the weights-only checkpoint
                tracking.log_model_files(uri, run_id, [Path(d) / MODEL_FILE, Path(d) / CONFIG_FILE],
                                         params={"recipe": metrics.get("recipe", ""), "steps": metrics.get("step")})  # fmt: skip
    if uri and run_id:
        tracking.end_run(uri, run_id, "FINISHED")
    return metrics
