"""Every listener of a local 2-worker `raysys pretrain` binds loopback.

The run is a real `raysys pretrain` process with its own local Ray; the test polls the listening
sockets (psutil) of that process and all its descendants (GCS, raylet, agents, the Ray Train
workers and their torch.distributed store and gloo listeners) while it trains. Ray Train's
default `TorchConfig`, run in this process's Ray, is the baseline that fails the same check: its
store listens on every interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import ray.train
import torch
import torch.distributed as dist
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder
from ray.train.torch import TorchConfig, TorchTrainer

from raysys.pretrain import ray_train
from raysys.pretrain.config import TrainConfig
from raysys.pretrain.rendezvous import LoopbackTorchConfig

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def is_loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    mapped = getattr(a, "ipv4_mapped", None)
    return a.is_loopback or bool(mapped and mapped.is_loopback)


def listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, ip, port) of every listening socket of `root` and its descendants."""
    out = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            out |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_every_listener_of_a_two_worker_pretrain_is_on_loopback(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_images=40, dim=16)
    bert = tiny_bert_folder(tmp_path / "bert")
    env = {**os.environ, "RAYSYS_RAY_TMP": tempfile.mkdtemp(prefix="rs-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raysys", "pretrain", "--data", str(data), "--name", "lo", "--storage", str(tmp_path / "runs"),
           f"model_path={bert}", "workers=2", "cpus_per_worker=0.5", "steps=6", "steps_per_epoch=3", "batch_size=8",
           "window_images=8", "tracking_uri=none", "log_every=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[tuple[str, str, int]] = set()
    root = psutil.Process(proc.pid)

    def poll():
        while proc.poll() is None:
            seen.update(listeners(root))
            time.sleep(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate(timeout=900)
    t.join()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["complete"]
    names = {n for n, _, _ in seen}
    assert any("RayTrainWorker" in n for n in names) and "raylet" in names, names  # the poll saw the run
    wide = sorted(s for s in seen if not is_loopback(s[1]))
    assert not wide, wide


def _listeners_after_init(config: dict) -> None:
    from ray.core.generated.common_pb2 import Address  # in the worker: a protobuf class does not pickle

    core = ray._private.worker.global_worker.core_worker
    ray_port = Address.FromString(core.get_owner_address(ray.put(0))).port
    t = torch.ones(1)
    dist.all_reduce(t)
    socks = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port != ray_port})  # fmt: skip
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"listen": socks, "sum": float(t)}))


def _run(tmp_path: Path, name: str, torch_config: TorchConfig) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    TorchTrainer(
        _listeners_after_init, train_loop_config={"out": str(out)}, torch_config=torch_config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "storage")),
    ).fit()  # fmt: skip
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_default_rendezvous_listens_widely_and_the_loopback_one_does_not(ray_session, tmp_path):
    """The worker's own listeners besides Ray's core-worker port: the torch store and gloo."""
    lo = _run(tmp_path, "loopback", LoopbackTorchConfig())
    assert [r["sum"] for r in lo] == [2.0, 2.0] and lo[0]["listen"], lo  # rank 0 hosts the store
    assert all(is_loopback(ip) for r in lo for ip, _ in r["listen"]), lo
    default = _run(tmp_path, "default", TorchConfig())
    assert any(not is_loopback(ip) for ip, _ in default[0]["listen"]), default[0]["listen"]
    trainer = ray_train._trainer(TrainConfig(workers=2), Path("."), "x", "/tmp/unused", None, None, None)
    assert isinstance(trainer.backend_config, LoopbackTorchConfig)  # what `raysys pretrain` runs with
