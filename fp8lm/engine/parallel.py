"""Tensor parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs).

Rank 0 runs the engine: it schedules, samples, and sends each model step's inputs to the other
ranks with a broadcast; every rank runs the same step on its shard of the model (row-parallel
layers all-reduce their partial sums). On one host fp8lm starts the other ranks itself; across
hosts `torchrun` starts them (env:// rendezvous) and every rank but 0 runs `worker_loop`.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fp8lm.errors import FP8LMError

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT_S = 30.0     # a hung rank fails every other rank's next collective within this
COLLECTIVE_TIMEOUT_ENV = "FP8LM_TP_COLLECTIVE_TIMEOUT_S"    # overrides it (seconds; the ranks inherit it)
# Joining is not a collective: ranks that start beside other work import torch and fp8lm before
# they reach the store, which can take far longer than a step's collectives may.
RENDEZVOUS_TIMEOUT_S = 300.0
# The other ranks wait for rank 0's next message as long as a server stays idle. A rank that dies
# closes its sockets, which fails a waiting broadcast at once; a hung one is caught by the step's
# own collectives (COLLECTIVE_TIMEOUT_S).
IDLE_TIMEOUT = datetime.timedelta(days=365)
PARENT_POLL_S = 1.0
WORKER_POLL_S = 0.2
LOOPBACK = "127.0.0.1"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def torchrun_info() -> DistInfo | None:
    """The rank this process was given by torchrun (or another env:// launcher), if any."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One device per rank: cuda:<local rank> on GPUs, the CPU otherwise."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def init_group(backend: str, rank: int, world_size: int, rendezvous: str | int, listener_fd: int | None = None) -> None:
    """`rendezvous`: "env://" (a launcher's, across hosts), or the port of rank 0's store on this host
    (`LocalRendezvous`, whose listening socket rank 0 passes as `listener_fd`): then every listener
    of the group is on the loopback interface."""
    if backend == "gloo":
        # Ranks on one host share its cores: more threads than cores would spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    timeout = datetime.timedelta(seconds=collective_timeout_s())
    if rendezvous == "env://":
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
        return
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()     # gloo's pair sockets on loopback too
    joining = max(datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S), timeout)
    store = dist.TCPStore(LOOPBACK, rendezvous, world_size, is_master=listener_fd is not None, timeout=joining,
                          master_listen_fd=listener_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LocalRendezvous:
    """Rank 0's store for ranks it starts on this host: listening on 127.0.0.1 only, on a port it
    holds from the start (bound and listening before any rank is told it, so none can take it)."""

    def __init__(self, world_size: int):
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(world_size)
        self.port = self.listener.getsockname()[1]
        self.world_size = world_size

    def join(self, backend: str, workers: list) -> None:
        """Rank 0 joins (the others join with `init_group(..., self.port)`) while it watches the
        processes of the others: one that exits before joining (an error while it starts) ends the
        wait at once, with every other rank stopped, instead of after RENDEZVOUS_TIMEOUT_S."""
        joined, failure = threading.Event(), []

        def run() -> None:
            try:
                init_group(backend, 0, self.world_size, self.port, self.listener.fileno())
            except BaseException as e:   # raised again on the caller's thread
                failure.append(e)
            finally:
                joined.set()

        threading.Thread(target=run, name="fp8lm-tp-join", daemon=True).start()
        while not joined.wait(WORKER_POLL_S):
            gone = [p for p in workers if p.exitcode is not None]
            if gone:
                for p in workers:
                    p.terminate()
                raise FP8LMError(f"tensor-parallel worker {gone[0].name} exited with code {gone[0].exitcode} "
                                 f"before joining rank 0 (its error is in the log above)")
        if failure:
            raise failure[0]


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (Linux: lo)."""
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    raise FP8LMError("no loopback network interface found for the tensor-parallel ranks")


def collective_timeout_s() -> float:
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None:
        return COLLECTIVE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise FP8LMError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: expected seconds") from None
    if not value > 0:
        raise FP8LMError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: must be positive (seconds)")
    return value


def spawn_local_workers(target, engine_config, world_size: int, port: int) -> list:
    """Starts ranks 1..N-1 on this host (fresh interpreters: no inherited threads or state), each
    running target(engine_config, DistInfo(rank, world_size, rank), port of rank 0's store)."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, world_size):
        p = ctx.Process(target=_run_worker, args=(target, engine_config, DistInfo(rank, world_size, rank), port),
                        name=f"fp8lm-tp-rank{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _run_worker(target, engine_config, dist_info: DistInfo, port: int) -> None:
    rank = dist_info.rank
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    exit_with_parent()
    try:
        target(engine_config, dist_info, port)
    except Exception as e:
        log.error("rank %d stopped: %s", rank, e)
        raise SystemExit(1) from None


def exit_with_parent() -> None:
    """Ends this process as soon as the one that started it is gone, even by SIGKILL (which runs no
    handler there): a daemon thread watches the parent pid."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.error("rank 0 (pid %d) is gone; this rank exits", parent)
        os._exit(1)

    threading.Thread(target=watch, name="fp8lm-parent-watch", daemon=True).start()


def check_divisible(config, world_size: int) -> None:
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    bad = {k: v for k, v in sizes.items() if v % world_size}
    if bad:
        raise FP8LMError(f"tensor_parallel_size={world_size} does not divide "
                         + ", ".join(f"{k}={v}" for k, v in bad.items())
                         + " of this model; it must divide all of "
                         + ", ".join(f"{k}={v}" for k, v in sizes.items()))
