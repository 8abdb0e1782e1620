"""Start the instances of one layout, hand back its entry points, stop them.

    with Deployment(model="smollm2", mode="disaggregated", num_prefill=2, num_decode=1) as d:
        engine = RemoteEngine(d.endpoints[0])

Layouts: `num_instances` colocated (mixed) instances, or `num_prefill` prefill
and `num_decode` decode instances, every decode instance reaching every
prefill instance through `--innode-prefill-ports` (FastDeploy's single-machine
mode). The entry points are the mixed instances, or the decode instances.

Devices: each instance takes as many consecutive GPUs as its tensor-parallel
size (prefills first, then decodes, or the colocated replicas in order). When
the layout needs more GPUs than there are, instances wrap around and share
them (each then gets a share of their memory). On a machine without GPUs each
instance gets a share of the cores.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdlab.cluster.launch import InstanceProcess, start_instance

Mode = Literal["colocated", "disaggregated"]


def cpu_threads(num_instances: int) -> int:
    """Threads of each of `num_instances` instances on a machine without GPUs: a share of the cores
    (more threads than cores, and OpenMP crawls)."""
    return max(1, (os.cpu_count() or 1) // num_instances)


def _num_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


@dataclass
class Deployment:
    model: str
    mode: Mode = "colocated"
    engine_args: list[str] = field(default_factory=list)
    protocol: str = "ipc"
    num_instances: int = 1  # colocated
    num_prefill: int = 1  # disaggregated
    num_decode: int = 1  # disaggregated
    tensor_parallel_size: int = 1  # colocated instances' GPUs
    prefill_tp: int = 1
    decode_tp: int = 1
    log_dir: Path | None = None
    transfer_timeout_s: float = 30.0
    ready_timeout_s: float = 600.0
    instances: list[InstanceProcess] = field(default_factory=list)

    @property
    def roles(self) -> list[tuple[str, int]]:
        """(role, tensor-parallel size) of each instance, in start order."""
        if self.mode == "colocated":
            return [("mixed", self.tensor_parallel_size)] * self.num_instances
        return [("prefill", self.prefill_tp)] * self.num_prefill + [("decode", self.decode_tp)] * self.num_decode

    @property
    def endpoints(self) -> list[str]:
        """Where clients send requests: the mixed instances, or the decode instances."""
        return [p.endpoint for p in self.instances if p.role in ("mixed", "decode")]

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    def placement(self) -> list[dict[str, str]]:
        """The environment of each instance (start order): its GPUs, or its share of the cores."""
        roles = self.roles
        gpus = _num_gpus()
        if not gpus:
            threads = str(cpu_threads(len(roles)))
            return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in roles]
        envs, next_gpu = [], 0
        for _, tp in roles:
            if next_gpu + tp > gpus:
                next_gpu = 0  # wrap around: share
            envs.append({"CUDA_VISIBLE_DEVICES": ",".join(str((next_gpu + r) % gpus) for r in range(tp))})
            next_gpu += tp
        return envs

    def gpu_share(self, env: dict[str, str], envs: list[dict[str, str]]) -> list[str]:
        """Instances sharing a GPU split its memory."""
        if "CUDA_VISIBLE_DEVICES" not in env:
            return []
        mine = set(env["CUDA_VISIBLE_DEVICES"].split(","))
        sharing = sum(1 for e in envs if mine & set(e["CUDA_VISIBLE_DEVICES"].split(",")))
        return ["--gpu-memory-utilization", f"{0.9 / sharing:.2f}"] if sharing > 1 else []

    def start(self) -> Deployment:
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="pdlab-logs-"))
        envs = self.placement()
        common = [*self.engine_args, "--cache-transfer-protocol", self.protocol,
                  "--transfer-timeout-s", str(self.transfer_timeout_s)]
        try:
            prefill_ports = []
            for (role, tp), env in zip(self.roles, envs):
                args = [*common, *self.gpu_share(env, envs), "--tensor-parallel-size", str(tp)]
                if role == "decode":
                    args += ["--innode-prefill-ports", ",".join(map(str, prefill_ports))]
                proc = start_instance(role, self.model, log_dir, extra_args=args, env=env)
                self.instances.append(proc)
                if role == "prefill":
                    prefill_ports.append(proc.engine_worker_queue_port)
            for instance in self.instances:
                instance.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for instance in reversed(self.instances):
            instance.stop()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
