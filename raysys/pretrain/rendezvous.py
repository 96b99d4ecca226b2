"""The torch.distributed rendezvous of a Ray Train run, kept on loopback when it can be.

Ray Train's own `TorchConfig` points every rank at `MASTER_ADDR` = rank 0's node IP, and torch's
`TCPStore` server then listens on every interface (`*:PORT`), as does gloo's pair listener on the
interface the hostname resolves to. On one machine none of that needs to leave the host, so when
every worker of the group runs on one node this backend:

* binds the store's socket itself on 127.0.0.1 in rank 0 and hands it to `TCPStore` through
  `master_listen_fd` (the store never opens its own listener);
* sets `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` to the loopback interface, so the collectives'
  own listeners bind 127.0.0.1 too.

A group spread over several nodes (a cluster the user configured) keeps Ray's default, the node IP.
Ray's own processes (GCS, raylet, core-worker gRPC) are not covered: Ray 2.60 binds them to all
interfaces whatever `_node_ip_address` says (docs/cluster.md, "What listens").
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_listener: socket.socket | None = None  # rank 0's bound store socket (kept open: the store owns its fd)


def loopback_interface() -> str:
    """The name of the loopback interface (`lo` on Linux, `lo0` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def _bind_store_socket() -> int:
    """Rank 0: listen on 127.0.0.1, a free port; returns the port."""
    global _listener
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOPBACK, 0))
    s.listen(128)
    _listener = s
    return s.getsockname()[1]


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _init_loopback_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    iface = loopback_interface()
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": iface,
                       "NCCL_SOCKET_IFNAME": iface})  # fmt: skip
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    master = world_rank == 0
    fd = _listener.fileno() if master and _listener is not None else None
    store = dist.TCPStore(LOOPBACK, port, world_size, master, timeout=timeout, master_listen_fd=fd)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        ips = set(worker_group.execute(_node_ip))
        if len(ips) != 1 or backend_config.backend not in (None, "gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        port = worker_group.execute_single(0, _bind_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _init_loopback_group, backend=backend, world_rank=i, world_size=n,
                                                   port=port, timeout_s=backend_config.timeout_s)
                 for i in range(n)])  # fmt: skip


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """`TorchConfig` whose rendezvous stays on 127.0.0.1 when the group is on one node."""

    @property
    def backend_cls(self):
        return _LoopbackBackend
