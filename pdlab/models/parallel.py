"""Tensor parallelism: one process per rank, torch.distributed between them.

The engine process is rank 0: it owns the scheduler, and for every step it
broadcasts what to compute (`StepInputs`, as a flat int64 tensor: never
pickle) to the other ranks, which run `python -m pdlab.engine.tp_worker` and
do nothing but execute steps. Every rank holds its shard of the weights
(`pdlab/models/sharding.py`) and of the KV cache (its KV heads); the
row-parallel linears and the vocabulary-parallel embedding all-reduce, and
the LM head all-gathers the logits.

Two process groups: the default one for tensors (NCCL on GPUs, gloo on
CPUs) and a gloo group for the small per-step metadata, which the ranks need
on the host (vLLM does the same). Rank r uses `cuda:r` of the devices the
process sees (`CUDA_VISIBLE_DEVICES`). A worker ends with its rank 0, however
that ends (`pdlab.lifetime`), and rank 0 ends the group on `close`.

The ranks are on one machine and nothing of theirs listens beyond it: they
meet through a file store in a private directory (a `tcp://` store listens on
every interface, whatever address it is given), and gloo and NCCL keep their
sockets on the loopback interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
default to `lo` on Linux; set them to override).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from pdlab.errors import ConfigError
from pdlab.lifetime import child_env

STEP_TIMEOUT = timedelta(hours=2)  # a worker waits this long for rank 0's next step
STEP, CALL = 1, 2
# What rank 0 may ask every rank to do besides a step (ModelRunner's handlers).
CALLS = ("open_sender", "flush", "close_sender", "open_receiver", "commit")


@dataclass
class TensorParallel:
    rank: int
    size: int
    device: torch.device
    cpu_group: object = None  # gloo group for host-side metadata
    workers: list[subprocess.Popen] = field(default_factory=list)  # rank 0 only
    store_dir: str | None = None  # rank 0: the directory of the group's file store

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # --- collectives -------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the KV blocks each rank's memory allows)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast_ints(self, values: list[int] | None) -> list[int]:
        """Rank 0's list of ints, on every rank (length first, then the values)."""
        n = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.cpu_group)
        data = torch.tensor(values, dtype=torch.int64) if values is not None else torch.empty(int(n), dtype=torch.int64)
        if int(n):
            dist.broadcast(data, src=0, group=self.cpu_group)
        return data.tolist()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank (lengths first, then padded bytes)."""
        n = torch.tensor([len(data)], dtype=torch.int64)
        lengths = [torch.empty_like(n) for _ in range(self.size)]
        dist.all_gather(lengths, n, group=self.cpu_group)
        width = max(1, max(int(x) for x in lengths))
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.cpu_group)
        return [bytes(part[: int(length)].tolist()) for part, length in zip(parts, lengths)]

    # --- rank 0 -> the other ranks ---------------------------------------------------------------
    # Every message is a broadcast list of ints: [STEP, *step] (compute it), [CALL, name, *bytes]
    # (run the named handler on every rank, rank 0 included, and all-gather what each returns:
    # pdlab/engine/kv_io.py), or [] (stop). Rank 0 sends; the others run `serve`.

    def step(self, ints: list[int]) -> None:
        self.broadcast_ints([STEP, *ints])

    def serve(self, on_step, handlers: dict) -> None:
        """A rank > 0: follow rank 0's messages until it says stop."""
        while message := self.broadcast_ints(None):
            if message[0] == STEP:
                on_step(message[1:])
            else:
                name = CALLS[message[1]]
                self.all_gather_bytes(handlers[name](bytes(message[2:])))

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Rank 0: tell the workers to stop (an empty step), wait for them, end the group."""
        if self.is_driver and self.workers:
            try:
                self.broadcast_ints([])
            except Exception:  # a worker already gone: kill the rest below
                pass
            for proc in self.workers:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.workers = []
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


def tp_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r (of the visible GPUs) on CUDA; the CPU otherwise."""
    if device.type != "cuda":
        return device
    if rank >= torch.cuda.device_count():
        raise ConfigError(f"tensor parallelism needs a GPU per rank: rank {rank} of {torch.cuda.device_count()} "
                          "visible GPUs (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", rank)


def _init(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallel:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=STEP_TIMEOUT)
    cpu_group = dist.new_group(backend="gloo", timeout=STEP_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return TensorParallel(rank, size, device, cpu_group)


def start(config, device: torch.device, kv_cache_shm_path: str | None = None) -> TensorParallel:
    """Rank 0: start ranks 1..size-1 as `python -m pdlab.engine.tp_worker` processes and join them.

    `kv_cache_shm_path`: rank 0's shared-memory KV cache file; rank r's is `{path}-rank{r}`."""
    size = config.tensor_parallel_size
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ConfigError(f"--tensor-parallel-size {size} needs {size} GPUs; {torch.cuda.device_count()} visible "
                          "(CUDA_VISIBLE_DEVICES)")
    store_dir = tempfile.mkdtemp(prefix="pdlab-tp-")  # mode 0700: only this user's processes can join
    init_method = f"file://{store_dir}/store"
    payload = json.dumps(asdict(config))
    if sys.platform.startswith("linux"):
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(name, "lo")
    env = child_env()
    if device.type == "cpu":  # the ranks share this process's cores: more threads than cores and OpenMP crawls
        per_rank = max(1, torch.get_num_threads() // size)
        torch.set_num_threads(per_rank)
        env.update(OMP_NUM_THREADS=str(per_rank), MKL_NUM_THREADS=str(per_rank))
    workers = []
    for rank in range(1, size):
        argv = [sys.executable, "-m", "pdlab.engine.tp_worker", "--rank", str(rank), "--size", str(size),
                "--init-method", init_method, "--device", device.type]
        if kv_cache_shm_path is not None:
            argv += ["--kv-cache-shm-path", rank_shm_path(kv_cache_shm_path, rank)]
        workers.append(subprocess.Popen(argv, stdin=subprocess.PIPE, env=env, start_new_session=True))
    for proc in workers:
        proc.stdin.write(payload.encode())
        proc.stdin.close()
    try:
        tp = _init(0, size, init_method, tp_device(device, 0))
    except Exception as e:
        for proc in workers:
            proc.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
        raise ConfigError(f"tensor parallelism: the {size} ranks could not form a group: {e}") from None
    tp.workers, tp.store_dir = workers, store_dir
    return tp


def rank_shm_path(path: str, rank: int) -> str:
    return path if rank == 0 else f"{path}-rank{rank}"


def join(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallel:
    """A worker: join rank 0's group."""
    return _init(rank, size, init_method, tp_device(device, rank))


def check_workers(tp: TensorParallel | None) -> None:
    """Rank 0: raise if a worker died (its collectives would never complete)."""
    if tp is None:
        return
    for rank, proc in enumerate(tp.workers, start=1):
        if proc.poll() is not None:
            raise RuntimeError(f"tensor-parallel rank {rank} exited with code {proc.returncode}")
