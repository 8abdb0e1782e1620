"""Start the instances of one layout (colocated, or P prefill + 1 decode), hand back the entry point, stop them.

    with Deployment(model="smollm2", mode="disaggregated", engine_args=[...]) as d:
        engine = RemoteEngine(d.endpoint)

Devices: an instance takes `tensor_parallel_size` consecutive GPUs (a group).
With room for two or more groups, prefill instances go on the first groups and
the decode instance on the last (a colocated instance takes the first); with
one group every instance shares it (each gets a share of its memory); on a CPU
machine each instance gets a share of the cores.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdlab.cluster.launch import InstanceProcess, start_instance

Mode = Literal["colocated", "disaggregated"]


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
    num_prefill: int = 1
    log_dir: Path | None = None
    transfer_timeout_s: float = 30.0
    tensor_parallel_size: int = 1  # GPUs per instance (the flag itself travels in engine_args)
    ready_timeout_s: float = 600.0
    instances: list[InstanceProcess] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """Where clients send requests: the mixed instance, or the decode instance."""
        return self.instances[-1].endpoint

    def placement(self) -> list[dict[str, str]]:
        """Environment of each instance to start, in start order (prefills, then the entry point)."""
        num = 1 if self.mode == "colocated" else self.num_prefill + 1
        tp = self.tensor_parallel_size
        groups = _num_gpus() // tp
        if _num_gpus():
            if self.mode == "colocated" or groups <= 1:
                indices = [0] * num
            else:  # prefills round-robin over all groups but the last, which decodes
                indices = [i % (groups - 1) for i in range(num - 1)] + [groups - 1]
            return [{"CUDA_VISIBLE_DEVICES": ",".join(str(g * tp + r) for r in range(tp))} for g in indices]
        threads = str(max(1, (os.cpu_count() or 1) // num))
        return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(num)]

    def gpu_share(self, envs: list[dict[str, str]]) -> list[str]:
        """Instances sharing one GPU split its memory."""
        if not _num_gpus():
            return []
        per_gpu = max(sum(1 for e in envs if e["CUDA_VISIBLE_DEVICES"] == d["CUDA_VISIBLE_DEVICES"]) for d in envs)
        return ["--gpu-memory-utilization", f"{0.9 / per_gpu:.2f}"] if per_gpu > 1 else []

    def start(self) -> Deployment:
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="pdlab-logs-"))
        envs = self.placement()
        common = [*self.engine_args, *self.gpu_share(envs), "--cache-transfer-protocol", self.protocol,
                  "--transfer-timeout-s", str(self.transfer_timeout_s)]
        try:
            if self.mode == "colocated":
                self.instances.append(start_instance("mixed", self.model, log_dir, extra_args=common, env=envs[0]))
            else:
                for env in envs[:-1]:
                    self.instances.append(start_instance("prefill", self.model, log_dir, extra_args=common, env=env))
                ports = ",".join(str(p.engine_worker_queue_port) for p in self.instances)
                self.instances.append(start_instance("decode", self.model, log_dir, env=envs[-1],
                                                     extra_args=[*common, "--innode-prefill-ports", ports]))
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
