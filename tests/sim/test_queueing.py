"""The simulator against queueing theory: M/D/1 on the prefill side, saturation throughput on the decode side."""

import random

import pytest

from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import FixedCost, InstanceSpec, Layout, simulate, simulate_cluster
from pdlab.workload.workload import RequestSpec


def poisson_requests(n, rate_rps, prompt_tokens, max_tokens, seed):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate_rps)
        out.append(RequestSpec(f"req-{i}", t, tuple([100] * prompt_tokens), max_tokens))
    return out


def test_md1_mean_ttft():
    # One request per step (batch size 1), every step D: a prefill-only M/D/1 server.
    d, rate = 0.010, 60.0  # rho = 0.6
    layout = Layout(InstanceSpec(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64),
                                 num_blocks=64, block_size=16))
    requests = poisson_requests(40_000, rate, prompt_tokens=8, max_tokens=1, seed=1)
    records = simulate(requests, layout, FixedCost(d), seed=0)
    assert all(r.ok and r.num_output_tokens == 1 for r in records)
    mean_ttft = sum(r.ttft_s for r in records) / len(records)
    theory = d + rate * d * d / (2 * (1 - rate * d))
    assert mean_ttft == pytest.approx(theory, rel=0.03)


def test_decode_saturation_throughput():
    # Many more requests than slots, all at t=0: every step decodes max_num_seqs tokens.
    d, seqs = 0.020, 8
    config = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=512, max_model_len=512)
    layout = Layout(InstanceSpec(config, num_blocks=4096), mode="disaggregated", link=_ideal())
    requests = [RequestSpec(f"req-{i}", 0.0, (100,) * 16, 50) for i in range(64)]
    records, cluster = simulate_cluster(requests, layout, FixedCost(d))
    decode = cluster.entries[0]
    tokens = sum(r.num_output_tokens - 1 for r in records)  # the first token comes from the prefill
    assert decode.num_steps * seqs == tokens  # every decode step was full
    # Each request: 49 decode steps of d after its first token.
    assert all(r.tpot_s == pytest.approx(d) for r in records)


def _ideal():
    from pdlab.sim import LINKS

    return LINKS["ideal"]
