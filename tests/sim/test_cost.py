"""Cost models: FixedCost, and RooflineCost against the benchmarks in data/bench/: it counts the bytes their floor
counts (H100, engine_speed.json), and it predicts the step times measured on an H200 (engine_speed_h200.json)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pdlab.models.presets import PRESETS
from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest
from pdlab.sampling_params import SamplingParams
from pdlab.sim import H100, FixedCost, RooflineCost

LLAMA3_8B = PRESETS["llama3-8b"]
BENCH = Path(__file__).parents[2] / "data" / "bench" / "engine_speed.json"
BENCH_H200 = BENCH.with_name("engine_speed_h200.json")
# How far the default roofline may be from a measured bf16 step (the worst now: 20%, a 512-token prefill).
ROOFLINE_TOLERANCE = 0.25


def batch(*items):
    """items: (start, num_tokens); each item samples."""
    return ScheduledBatch([ScheduledRequest(Request(f"r{i}", [5] * (s + n), SamplingParams()), s, n, True)
                           for i, (s, n) in enumerate(items)])


def ideal(**kw):
    """No efficiency losses, no overhead: the pure roofline."""
    return RooflineCost(LLAMA3_8B, compute_efficiency=1.0, bandwidth_efficiency=1.0, step_overhead_s=0.0, **kw)


def test_fixed_cost():
    assert FixedCost(0.25).step_time_s(batch((0, 100))) == 0.25
    with pytest.raises(ValueError):
        FixedCost(0)


def test_decode_bytes_are_the_bytes_of_the_benchmarks_floor():
    # The benchmark's floor: weights (less the embedding table) + the batch's KV, over the measured copy bandwidth.
    # Both sides are computed from the model's shape: this checks that the two count the same bytes.
    bench = json.loads(BENCH.read_text())
    gpu = replace(H100, mem_bandwidth_bytes_per_s=bench["copy_GBps"] * 1e9)
    cost = ideal(gpu=gpu)
    for row in bench["decode"]:
        b, context = row["batch"], row["context"]
        # Each sequence has `context` tokens of KV and computes one more.
        step_s = cost.step_time_s(batch(*[(context, 1)] * b))
        assert step_s * 1e3 == pytest.approx(row["floor_ms"], rel=0.01), row


def test_default_roofline_predicts_the_measured_bf16_step_times():
    """llama3-8b bf16 with CUDA graphs on an H200 (benchmarks/engine_speed.py), against the default efficiencies on
    that card's measured copy bandwidth and matmul peak. (The wint kernels do not reach their roofline yet, README.)"""
    bench = json.loads(BENCH_H200.read_text())
    h200 = replace(H100, name="h200", mem_bandwidth_bytes_per_s=bench["copy_GBps"] * 1e9,
                   peak_flops=bench["matmul_TFLOPs"] * 1e12)
    cost = RooflineCost(LLAMA3_8B, gpu=h200)
    (bf16,) = [v for v in bench["variants"] if v["variant"] == "bf16" and v["cuda_graphs"]]
    steps = [(f"decode batch {r['batch']}", batch(*[(r["context"], 1)] * r["batch"]), r["step_ms"])
             for r in bf16["decode"]]
    steps += [(f"prefill {r['tokens']}", batch((0, r["tokens"])), r["prefill_ms"]) for r in bf16["prefill"]]
    assert len(steps) == 8
    for what, b, measured_ms in steps:
        assert cost.step_time_s(b) * 1e3 == pytest.approx(measured_ms, rel=ROOFLINE_TOLERANCE), what


def test_long_prefill_is_compute_bound_and_superlinear():
    cost = ideal()
    t1, t8 = cost.step_time_s(batch((0, 1024))), cost.step_time_s(batch((0, 8192)))
    flops_1k = 2 * cost.linear_params * 1024
    assert t1 >= flops_1k / H100.peak_flops
    assert t8 > 8 * t1  # attention is quadratic in the prompt


def test_tensor_parallel_splits_work_and_adds_all_reduces():
    one, two = ideal(), ideal(tp=2)
    decode = batch(*[(1024, 1)] * 8)
    assert two.weight_bytes_read == pytest.approx(one.weight_bytes_read / 2)
    assert two.allreduce_s(8) > 0 and one.allreduce_s(8) == 0
    assert two.step_time_s(decode) == pytest.approx(one.step_time_s(decode) / 2 + two.allreduce_s(8), rel=1e-9)
    with pytest.raises(ValueError):
        RooflineCost(LLAMA3_8B, tp=3)


def test_weight_only_quantisation_shrinks_the_decode_floor():
    bf16, int4 = ideal(), ideal(weight_bits=4)
    one = batch((1024, 1))
    assert int4.step_time_s(one) < bf16.step_time_s(one) / 3
    # Compute-bound prefill gains nothing: the matmuls still run in bf16.
    assert int4.step_time_s(batch((0, 4096))) == pytest.approx(bf16.step_time_s(batch((0, 4096))))


def test_kv_cache_capacity():
    cost = RooflineCost(LLAMA3_8B)
    blocks = cost.max_num_blocks(16)
    kv_gib = blocks * 16 * LLAMA3_8B.kv_bytes_per_token(2) / 2**30
    assert 50 < kv_gib < 60  # 80 GiB * 0.9 - 15 GB of weights - 2 GiB of activations


def test_mixture_of_experts_reads_only_the_experts_it_touches():
    from pdlab.sim.cost import MoeSpec

    # A toy MoE on llama3-8b's attention: 64 experts of 1/8 the dense width, 8 per token, none shared.
    moe = MoeSpec(num_experts=64, experts_per_token=8, expert_intermediate_size=LLAMA3_8B.intermediate_size // 8)
    dense, sparse = ideal(), ideal(moe=moe)
    # Active parameters per token equal the dense model's MLP (8 x 1/8), plus the router.
    router = LLAMA3_8B.num_layers * LLAMA3_8B.hidden_size * 64
    assert sparse.linear_params == dense.linear_params + router
    # Stored: 8x the dense MLP weights; one token reads only 8 of 64 experts, a big prefill all of them.
    mlp_bytes = LLAMA3_8B.num_layers * 3 * LLAMA3_8B.hidden_size * LLAMA3_8B.intermediate_size * 2
    assert sparse.weight_bytes_stored == pytest.approx(dense.weight_bytes_stored + 7 * mlp_bytes + router * 2)
    assert sparse.weight_bytes_for(1) == pytest.approx(dense.weight_bytes_read + router * 2)
    assert sparse.weight_bytes_for(4096) == pytest.approx(sparse.weight_bytes_stored
                                                          - LLAMA3_8B.vocab_size * LLAMA3_8B.hidden_size * 2)
    decode_1, decode_64 = (sparse.step_time_s(batch(*[(1024, 1)] * b)) for b in (1, 64))
    assert decode_1 == pytest.approx(dense.step_time_s(batch((1024, 1))), rel=0.01)
    assert decode_64 > 3 * decode_1  # a batch of 64 touches nearly every expert
