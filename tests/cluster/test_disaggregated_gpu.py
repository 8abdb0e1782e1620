"""Disaggregated prefill (GPU 0) and decode (GPU 1) over CUDA IPC against a colocated instance."""

from __future__ import annotations

import time

import pytest
import torch

from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import start_instance
from pdlab.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

MODEL = "smollm2-135m"  # the real shape with random weights: the GGUF is not on GPU machines
COMMON = ["--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
          "--cache-transfer-protocol", "ipc"]


def serve(endpoint: str, prompts, params, stagger_s: float = 0.0) -> dict:
    engine = RemoteEngine(endpoint)
    outs = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(prompt, p, f"g{i}")
        deadline = time.monotonic() + stagger_s
        while time.monotonic() < deadline:
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
    outs.update(engine.drain(timeout_s=120))
    engine.close()
    return outs


def test_ipc_between_two_gpus_is_token_identical_to_colocated(tmp_path):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 400, (16,), generator=gen)]
    params = [SamplingParams(max_tokens=24, temperature=0 if i % 2 else 0.8, seed=i, ignore_eos=True) for i in range(16)]

    mixed = start_instance("mixed", MODEL, tmp_path, extra_args=COMMON, env={"CUDA_VISIBLE_DEVICES": "0"})
    try:
        mixed.wait_ready(300)
        want = serve(mixed.endpoint, prompts, params)
    finally:
        mixed.stop()
    prefill = start_instance("prefill", MODEL, tmp_path, extra_args=COMMON + ["--max-num-batched-tokens", "128"],
                             env={"CUDA_VISIBLE_DEVICES": "0"})
    decode = start_instance("decode", MODEL, tmp_path, env={"CUDA_VISIBLE_DEVICES": "1"},
                            extra_args=COMMON + ["--innode-prefill-ports", str(prefill.engine_worker_queue_port)])
    try:
        prefill.wait_ready(300)
        decode.wait_ready(300)
        got = serve(decode.endpoint, prompts, params, stagger_s=0.02)
        pongs = [ping(prefill.endpoint), ping(decode.endpoint)]
    finally:
        prefill.stop()
        decode.stop()
    assert len(got) == len(want) == 16
    assert all(o.error is None for o in got.values()), [o.error for o in got.values() if o.error]
    same = [got[k].token_ids == want[k].token_ids for k in want]
    print(f"token-identical: {sum(same)} of {len(same)}")
    assert all(same)
    for pong in pongs:
        assert pong.num_free_blocks == pong.num_blocks and pong.num_held == 0
