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
them. On a machine without GPUs each instance gets a share of the cores.

Instances that share a GPU (a 1P1D pair on one card, say):
- split its memory: `memory_share` gives a role its `--gpu-memory-utilization`
  (default: the engine's, divided among the instances on the card);
- run time-sliced (`gpu_sharing="time"`: separate processes, the driver takes
  turns) or side by side under CUDA MPS (`"mps"`: the deployment starts the MPS
  daemon unless one runs, stops what it started, and gives each role its
  `sm_percentage`);
- hold one copy of the weights (`share_weights`): a decode instance on the
  same GPU as a prefill instance maps the prefill's weights (`--weights-from`).

Lifetime: the instances end with the process that started them, however it
ends; while they run, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the
main thread, so that `with` stops them as it does on Ctrl-C. Start-up prints a
line per instance (`progress`), logs go to a temporary directory removed on
`stop` (kept when an instance failed to start) unless `log_dir` is given, and
`stop` warns when other processes kept the machine busy meanwhile (timings
then mean little).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdlab.cluster.launch import InstanceProcess, LaunchError, interrupt_on_sigterm, start_instance
from pdlab.cluster.mps import MpsDaemon, MpsError
from pdlab.policy.devices import gpus_of
from pdlab.provenance import LoadWatch, busy_warning

Mode = Literal["colocated", "disaggregated"]
GpuSharing = Literal["time", "mps"]


def cpu_threads(num_instances: int) -> int:
    """Threads of each of `num_instances` instances on a machine without GPUs: a share of the cores
    (more threads than cores, and OpenMP crawls)."""
    return max(1, (os.cpu_count() or 1) // num_instances)


def check_device(engine_args: list[str]) -> None:
    """Raise `ConfigError` now if the instances' `--device` names hardware this machine lacks."""
    if "--device" in engine_args[:-1]:
        from pdlab.models.load import resolve_device

        resolve_device(engine_args[engine_args.index("--device") + 1])


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
    log_dir: Path | None = None  # None: a temporary directory, removed on stop
    transfer_timeout_s: float = 30.0
    ready_timeout_s: float = 600.0
    progress: bool = True  # a line on stderr as each instance is ready
    # Instances sharing a GPU (see the module's docstring); roles: "mixed", "prefill", "decode".
    gpu_sharing: GpuSharing = "time"
    sm_percentage: dict[str, int] = field(default_factory=dict)  # mps: a role's SM limit (default 100)
    memory_share: dict[str, float] = field(default_factory=dict)  # a role's --gpu-memory-utilization
    # Each instance's --gpu-memory-utilization, split evenly among instances that share a GPU (and no role's
    # `memory_share`). None: the engine's default. Not in `engine_args`, where the split could not see it.
    gpu_memory_utilization: float | None = None
    share_weights: bool = True
    mps_per_context: bool = True  # the MPS daemon's per-context SM partitioning
    instances: list[InstanceProcess] = field(default_factory=list)
    mps: MpsDaemon | None = None
    load: dict | None = None  # after stop: `LoadWatch.report()` of the deployment's lifetime
    _undo_sigterm: Callable[[], None] | None = field(default=None, repr=False)
    _temp_log_dir: Path | None = field(default=None, repr=False)
    _load_watch: LoadWatch | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if "--gpu-memory-utilization" in self.engine_args:
            raise ValueError("give the memory share as Deployment(gpu_memory_utilization=...), not in engine_args: "
                             "the deployment splits it among the instances that share a GPU")

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
        return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))} for ids in gpus_of([tp for _, tp in roles], gpus)]

    def sharing(self, env: dict[str, str], envs: list[dict[str, str]]) -> int:
        """How many instances (this one included) use a GPU of this one's."""
        if "CUDA_VISIBLE_DEVICES" not in env:
            return 1
        mine = set(env["CUDA_VISIBLE_DEVICES"].split(","))
        return sum(1 for e in envs if mine & set(e["CUDA_VISIBLE_DEVICES"].split(",")))

    def gpu_args(self, role: str, env: dict[str, str], envs: list[dict[str, str]]) -> list[str]:
        """A role's flags for its GPU: its memory share, and under MPS its SM limit."""
        args = []
        if role in self.memory_share:
            args += ["--gpu-memory-utilization", f"{self.memory_share[role]:g}"]
        elif (sharing := self.sharing(env, envs)) > 1:
            args += ["--gpu-memory-utilization", f"{self.utilization / sharing:.3f}"]
        elif self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.gpu_sharing == "mps" and role in self.sm_percentage:
            args += ["--sm-percentage", str(self.sm_percentage[role])]
        return args

    @property
    def utilization(self) -> float:
        """Each instance's share of a GPU it has alone: `gpu_memory_utilization`, or the engine's default."""
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        from pdlab.engine.config import EngineConfig

        return EngineConfig().gpu_memory_utilization

    def start(self) -> Deployment:
        check_device(self.engine_args)  # a missing GPU fails now, not after the instances have started
        envs = self.placement()
        common = [*self.engine_args, "--cache-transfer-protocol", self.protocol,
                  "--transfer-timeout-s", str(self.transfer_timeout_s)]
        self._load_watch = LoadWatch()
        self._undo_sigterm = interrupt_on_sigterm()
        try:
            if self.log_dir is None:
                self._temp_log_dir = Path(tempfile.mkdtemp(prefix="pdlab-logs-"))
            log_dir = self.log_dir or self._temp_log_dir
            if self.gpu_sharing == "mps":
                if not _num_gpus():
                    raise MpsError("gpu_sharing mps needs a GPU; this machine has none visible")
                self.mps = MpsDaemon(per_context=self.mps_per_context).start()
            prefills: list[tuple[InstanceProcess, dict[str, str]]] = []
            self._say(f"starting {len(self.roles)} instance(s) of {self.model} "
                      f"({', '.join(role for role, _ in self.roles)}); logs in {log_dir}")
            start_s = time.monotonic()
            for (role, tp), env in zip(self.roles, envs):
                args = [*common, *self.gpu_args(role, env, envs), "--tensor-parallel-size", str(tp)]
                if role == "decode":
                    args += ["--innode-prefill-ports", ",".join(str(p.engine_worker_queue_port) for p, _ in prefills)]
                    owner = self.weights_owner(env, tp, prefills)
                    if owner is not None:
                        args += ["--weights-from", str(owner.engine_worker_queue_port)]
                proc = start_instance(role, self.model, log_dir, extra_args=args,
                                      env={**env, **(self.mps.env if self.mps else {})})
                self.instances.append(proc)
                if role == "prefill":
                    prefills.append((proc, env))
            for i, instance in enumerate(self.instances, start=1):
                instance.wait_ready(self.ready_timeout_s)
                self._say(f"  {instance.role} instance {i}/{len(self.instances)} ready after "
                          f"{time.monotonic() - start_s:.1f} s")
        except BaseException as e:
            if isinstance(e, LaunchError):
                self._temp_log_dir = None  # kept: the error names the log that tells why
            self.stop()
            raise
        return self

    def weights_owner(self, env: dict[str, str], tp: int, prefills: list[tuple[InstanceProcess, dict[str, str]]]
                      ) -> InstanceProcess | None:
        """The prefill instance on exactly this decode's GPU whose weights it maps (share_weights), if any."""
        if not self.share_weights or tp != 1 or "CUDA_VISIBLE_DEVICES" not in env or "ipc" not in self.protocol:
            return None
        return next((p for p, e in prefills if e.get("CUDA_VISIBLE_DEVICES") == env["CUDA_VISIBLE_DEVICES"]), None)

    def stop(self) -> None:
        """Stop the instances, decodes (which may map a prefill's weights) before prefills; then MPS, if started."""
        if self._undo_sigterm is not None:  # a second SIGTERM while stopping ends this process (the instances follow)
            self._undo_sigterm()
            self._undo_sigterm = None
        for instance in reversed(self.instances):
            instance.stop()
        if self.mps is not None:
            self.mps.stop()
            self.mps = None
        if self._load_watch is not None:
            self.load = self._load_watch.report()
            warning = busy_warning(self.load, f"the {self.mode} deployment of {self.model}")
            if warning:
                print(warning, file=sys.stderr)
            self._load_watch = None
        if self._temp_log_dir is not None:
            shutil.rmtree(self._temp_log_dir, ignore_errors=True)
            self._temp_log_dir = None

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
