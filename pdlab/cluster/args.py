"""FastDeploy's instance flags (and pdlab's own), shared by every entry point that starts an instance."""

from __future__ import annotations

import argparse
import os

from pdlab.cluster.auth import TOKEN_ENV
from pdlab.engine.config import QUANTIZATIONS, EngineConfig
from pdlab.transfer import PROTOCOLS

ROLES = ("mixed", "prefill", "decode")
MPS_THREAD_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def add_instance_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", default="smollm2", help="a preset, a Hugging Face model directory, a .gguf file, or smollm2")
    p.add_argument("--splitwise-role", choices=ROLES, default="mixed", help="mixed (colocated), prefill or decode")
    p.add_argument("--port", type=int, default=None, help="the OpenAI-compatible HTTP API's port (api_server)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (none: no metrics server)")
    p.add_argument("--engine-worker-queue-port", type=int, required=True, help="this instance's task port")
    p.add_argument("--cache-queue-port", type=int, required=True, help="this instance's KV transfer coordination port")
    p.add_argument("--innode-prefill-ports", default="",
                   help="decode only: the prefill instances' engine-worker-queue ports, comma-separated")
    p.add_argument("--cache-transfer-protocol", default="ipc",
                   help=f"KV transfer protocol(s), comma-separated, first usable wins: {', '.join(PROTOCOLS)}")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs (one process each) the model's weights and KV heads are sharded over")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="weight-only quantization of the linears (default none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default loopback only)")
    p.add_argument("--advertise-host", default=None,
                   help="the address other machines reach this instance at (default --host; needed with 0.0.0.0)")
    p.add_argument("--pd-comm-port", type=int, default=None,
                   help="port for prefill <-> decode control messages across machines (default: the "
                        "engine-worker-queue port takes prefill tasks, the cache-queue port takes KV)")
    p.add_argument("--rdma-comm-ports", default="",
                   help="rdma: one port per GPU where this instance (decode) accepts RDMA connections; "
                        "the NICs come from $KVCACHE_RDMA_NICS")
    s = p.add_argument_group("splitwise scheduler (FastDeploy's multi-machine mode)")
    s.add_argument("--scheduler-name", choices=("local", "splitwise"), default="local",
                   help="splitwise: register with the global scheduler in Redis, which routes every request")
    s.add_argument("--scheduler-host", default="127.0.0.1", help="the Redis server")
    s.add_argument("--scheduler-port", type=int, default=6379)
    s.add_argument("--scheduler-password", default=None)
    s.add_argument("--scheduler-topic", default="fd", help="instances of one deployment share a topic")
    s.add_argument("--scheduler-ttl", type=float, default=900.0,
                   help="seconds a request and its results live; a request not finished by then ends with an error")
    s.add_argument("--scheduler-heartbeat-s", type=float, default=0.2, help="how often an instance heartbeats")
    s.add_argument("--scheduler-expire-s", type=float, default=3.0,
                   help="an instance silent for longer is dropped, and the requests it served are sent elsewhere")
    s.add_argument("--scheduler-dispatch", default="fastdeploy",
                   choices=("fastdeploy", "least_loaded", "round_robin", "power_of_two"),
                   help="how the router picks instances: FastDeploy's random among the near-least loaded, ...")
    g = p.add_argument_group("sharing one GPU with other instances (pdlab's; FastDeploy has no such flags)")
    g.add_argument("--weights-from", type=int, default=None, metavar="PORT",
                   help="map the weights of the instance whose engine-worker-queue port this is, on this machine "
                        "and the same GPU, through CUDA IPC instead of loading a copy (it must stay up)")
    g.add_argument("--weights-timeout-s", type=float, default=600.0,
                   help="how long to wait for the --weights-from instance to come up")
    g.add_argument("--sm-percentage", type=_percentage, default=None, metavar="N",
                   help="under CUDA MPS: let this instance's kernels use at most N%% of the GPU's SMs "
                        "(sets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE before CUDA starts; needs a running MPS daemon)")
    p.add_argument("--instance-id", default=None, help="a name for logs and metrics (default role:port)")
    p.add_argument("--transfer-timeout-s", type=float, default=30.0,
                   help="how long a decode instance waits for a prefill to take a task, or to answer a heartbeat "
                        "while it owes KV (a slower prefill that answers is waited for), and a prefill for "
                        "the decode's ack")
    d = EngineConfig()
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-gpu-blocks", dest="num_blocks", type=int, default=None, help="KV cache blocks (else from memory)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=d.enable_chunked_prefill)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--attention-backend", default=d.attention_backend, choices=("auto", "torch", "triton"),
                   help="auto: the Triton kernels on CUDA, PyTorch elsewhere")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (on CUDA, steps otherwise replay CUDA graphs: decode steps whole, "
                        "steps with prefill chunks piecewise around attention)")
    p.add_argument("--cuda-graph-max-tokens", type=_non_negative_int, default=d.cuda_graph_max_tokens,
                   help="steps with prefill chunks of up to this many tokens replay piecewise CUDA graphs; 0: they "
                        "run eagerly (decode steps still replay theirs)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="queue each decode step on the GPU before the host has the previous step's tokens, so the "
                        "host's work per step hides behind the GPU's (a request that stops on a token has one "
                        "extra step computed and thrown away)")
    p.add_argument("--max-waiting-requests", type=_positive_int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="mixed and decode: refuse a request with a 'queue full' error while this many are "
                        "waiting to start (not yet running, or waiting for KV blocks)")
    p.add_argument("--cluster-token", default=None,
                   help=f"a shared secret every message to this instance's control-plane ports must carry "
                        f"(default ${TOKEN_ENV}; none: not required). Prefer the environment variable: "
                        f"a flag shows in the process list")
    return p


DEFAULT_MAX_WAITING_REQUESTS = 4096


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _percentage(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 1 to 100, got {value}")
    return value


def apply_sm_percentage(percentage: int | None) -> None:
    """--sm-percentage: the MPS client limit, which CUDA reads when this process creates its context."""
    if percentage is not None:
        os.environ[MPS_THREAD_PERCENTAGE_ENV] = str(percentage)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size, num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill, max_model_len=args.max_model_len, seed=args.seed,
        quantization=args.quantization, attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens, async_scheduling=args.async_scheduling,
    )


def parse_ports(text: str) -> list[int]:
    return [int(p) for p in text.replace(" ", "").split(",") if p]


def parse_protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS and p != "rdma"]
    if unknown or not protocols:
        raise ValueError(f"--cache-transfer-protocol {text!r}: choose from {', '.join(PROTOCOLS)}")
    return protocols
