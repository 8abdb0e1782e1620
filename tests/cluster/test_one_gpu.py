"""Instances sharing one GPU (run on a machine with a GPU): memory shares, weights mapped from the prefill,
and MPS SM limits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.deployment import Deployment
from pdlab.cluster.launch import start_instance
from pdlab.engine.memory import ACTIVATION_RESERVE_BYTES, CUDA_CONTEXT_BYTES
from pdlab.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = "smollm2-135m"  # the real shape with random weights: the GGUF is not on GPU machines
COMMON = ["--max-model-len", "2048", "--enforce-eager"]


def blocks_of(instance) -> int:
    return ping(instance.endpoint, timeout_s=5).num_blocks


@pytest.mark.parametrize("order", [(0.3, 0.15), (0.15, 0.3)], ids=["large-first", "small-first"])
def test_two_instances_on_one_gpu_get_the_blocks_their_shares_allow_in_either_order(tmp_path, order):
    total = torch.cuda.mem_get_info()[1]
    bytes_per_block = 30 * 2 * 3 * 64 * 2 * 16  # smollm2-135m: layers, K and V, KV heads, head dim, bf16, block
    weights = 135e6 * 2 * 1.1  # bf16, with the allocator's rounding
    instances, blocks = [], {}
    try:
        for share in order:
            inst = start_instance("mixed", MODEL, tmp_path, env={"CUDA_VISIBLE_DEVICES": "0"},
                                  extra_args=[*COMMON, "--gpu-memory-utilization", str(share)])
            instances.append(inst)
            inst.wait_ready(300)  # one after the other: the second sees the first's memory in use
            blocks[share] = blocks_of(inst)
    finally:
        for inst in instances:
            inst.stop()
    for share, got in blocks.items():
        expected = (share * total - weights - CUDA_CONTEXT_BYTES - ACTIVATION_RESERVE_BYTES) / bytes_per_block
        assert 0.9 * expected <= got <= share * total / bytes_per_block, (share, got, expected)


def serve(endpoint: str, prompts: list[list[int]]) -> dict[str, list[int]]:
    engine = RemoteEngine(endpoint)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"r{i}")
    outs = engine.drain(timeout_s=120)
    engine.close()
    assert all(o.error is None for o in outs.values())
    return {rid: o.token_ids for rid, o in outs.items()}


def test_a_decode_that_maps_the_prefills_weights_answers_as_a_colocated_instance(tmp_path):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (int(n),), generator=gen).tolist() for n in (5, 60, 300, 900)]
    with Deployment(MODEL, "colocated", COMMON, log_dir=tmp_path / "colocated") as colocated:
        expected = serve(colocated.endpoint, prompts)
    with Deployment(MODEL, "disaggregated", COMMON, log_dir=tmp_path / "shared",
                    memory_share={"prefill": 0.2, "decode": 0.2}) as pair:
        assert serve(pair.endpoint, prompts) == expected
        shared_blocks = blocks_of(pair.instances[1])
        log = pair.instances[1].log_path.read_text()
    assert "--weights-from" in " ".join(pair.instances[1].argv)
    own = re.search(r"weights ([0-9.]+) GiB own \+ ([0-9.]+) GiB mapped", log)
    assert own is not None, log[-2000:]
    assert float(own.group(1)) < 0.01 and float(own.group(2)) > 0.2  # its own weight memory: near zero
    with Deployment(MODEL, "disaggregated", COMMON, log_dir=tmp_path / "copies", share_weights=False,
                    memory_share={"prefill": 0.2, "decode": 0.2}) as pair:
        copy_blocks = blocks_of(pair.instances[1])
    assert shared_blocks > copy_blocks  # the memory of a second copy went to the KV cache


MATMUL = """
import sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(100):
    a @ a
torch.cuda.synchronize()
print(time.perf_counter() - t)
"""


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None or os.geteuid() != 0,
                    reason="needs nvidia-cuda-mps-control, as root")
def test_an_instance_limited_to_a_fifth_of_the_sms_is_slower_on_a_compute_bound_loop():
    from pdlab.cluster.args import MPS_THREAD_PERCENTAGE_ENV
    from pdlab.cluster.mps import MpsDaemon

    def seconds(env: dict[str, str]) -> float:
        out = subprocess.run([sys.executable, "-c", MATMUL], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=300, check=True)
        return float(out.stdout.strip())

    with MpsDaemon() as daemon:
        full = seconds(daemon.env)
        limited = seconds({**daemon.env, MPS_THREAD_PERCENTAGE_ENV: "20"})
    assert limited > 2.0 * full, (full, limited)
