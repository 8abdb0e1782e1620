"""The disaggregated flow in the simulator: transfer overlap, link contention, KV sent again after a preemption on
the prefill, block hygiene, determinism."""

import pytest
import simpy

from pdlab.policy.request import Request
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sampling_params import SamplingParams
from pdlab.sim import LINKS, FixedCost, InstanceSpec, Layout, Link, LinkSpec, simulate, simulate_cluster
from pdlab.sim.cluster import SimCluster
from pdlab.workload.workload import RequestSpec

D = 0.050
CONFIG = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=1024)


def one_request(prompt_tokens=100, max_tokens=5):
    return [RequestSpec("req-0", 1.0, (100,) * prompt_tokens, max_tokens)]


def disagg(link, kv_bytes_per_token=1e6, num_layers=10, **kw):
    return Layout(InstanceSpec(CONFIG, num_blocks=512), mode="disaggregated", link=link,
                  kv_bytes_per_token=kv_bytes_per_token, num_layers=num_layers, **kw)


def test_ideal_link_ttft_is_the_prefill_step():
    (r,) = simulate(one_request(), disagg(LINKS["ideal"]), FixedCost(D))
    assert r.ttft_s == pytest.approx(D)
    assert r.tpot_s == pytest.approx(D)  # each later token is one decode step
    assert r.num_output_tokens == 5 and r.finish_reason == "length" and r.mode == "disaggregated"


def test_slow_link_adds_only_the_non_overlapped_part():
    num_bytes = 100 * 1e6  # 100 tokens x 1 MB
    # Transfer (1 s) much longer than the step: TTFT = latency + bytes / bandwidth (it started with the step).
    slow = LinkSpec("rdma", bandwidth_bytes_per_s=100e6, latency_s=0.002)
    (r,) = simulate(one_request(), disagg(slow), FixedCost(D))
    assert r.ttft_s == pytest.approx(0.002 + num_bytes / 100e6)
    # Transfer (20 ms) shorter than the step: only the last layer's tenth (2 ms) and the latency show.
    fast = LinkSpec("nvlink", bandwidth_bytes_per_s=5e9, latency_s=0.001)
    (r,) = simulate(one_request(), disagg(fast), FixedCost(D))
    assert r.ttft_s == pytest.approx(D + 0.001 + num_bytes / 10 / 5e9)


def test_chunked_prefill_sends_each_chunk_as_it_is_computed():
    # A 100-token prompt in two 50-token steps of 60 ms; each chunk's 50 MB takes 50 ms on the link.
    chunked = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=50, max_model_len=1024)
    layout = Layout(InstanceSpec(chunked, num_blocks=512), mode="disaggregated",
                    link=LinkSpec("nvlink", bandwidth_bytes_per_s=1e9), kv_bytes_per_token=1e6, num_layers=10)
    (r,) = simulate(one_request(), layout, FixedCost(0.060))
    # Chunk 1 is on the link during step 1, chunk 2 during step 2 (done at 110 ms); what shows is
    # the last chunk's last layer after step 2 ends: 120 ms + 5 MB / 1 GB/s.
    assert r.ttft_s == pytest.approx(0.120 + 0.005)


def test_link_shares_bandwidth_between_concurrent_transfers():
    env = simpy.Environment()
    link = Link(env, LinkSpec("pcie", bandwidth_bytes_per_s=100.0, latency_s=0.5))
    done = {}

    def send(name, start_s, num_bytes):
        yield env.timeout(start_s)
        yield link.transfer(num_bytes)
        done[name] = env.now

    env.process(send("a", 0.0, 100.0))
    env.process(send("b", 0.5, 100.0))
    env.process(send("c", 10.0, 100.0))  # alone
    env.run()
    # a flows alone from 0.5 (its latency): 50 bytes by 1.0, when b's bytes start. Sharing at 50 B/s,
    # a's last 50 end at 2.0; b then has 50 left, alone at 100 B/s: 2.5. c is alone: 10 + 0.5 + 1.
    assert done == pytest.approx({"a": 2.0, "b": 2.5, "c": 11.5})


def test_no_block_leaks_and_every_request_finishes():
    requests = [RequestSpec(f"req-{i}", i * 0.01, (100,) * (20 + i % 50), 1 + i % 30) for i in range(300)]
    small = InstanceSpec(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256),
                         num_blocks=40, block_size=16)
    layout = Layout(small, mode="disaggregated", num_prefill=2, num_decode=2, link=LINKS["pcie"],
                    kv_bytes_per_token=1e5, num_layers=4)
    records, cluster = simulate_cluster(requests, layout, FixedCost(0.01))
    assert all(r.ok and r.num_output_tokens == s.max_tokens for r, s in zip(records, requests))
    for instance in cluster.instances:
        assert instance.block_manager.num_free_blocks == instance.block_manager.num_blocks
        assert not instance.scheduler.has_unfinished() and not instance.scheduler.held
        assert instance.num_steps > 0  # both prefills and both decodes got work


def test_a_prompt_preempted_on_the_prefill_is_recomputed_and_its_kv_sent_again():
    # 8 blocks of 16 tokens for three 40-token prompts (3 blocks each), 32 tokens a 10 ms step, and a link slow
    # enough (40 ms a prompt) that finished prompts hold their blocks: a chunk finds none free, and the most
    # recently admitted prompt is preempted and recomputed from 0.
    prefill = InstanceSpec(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256), num_blocks=8)
    layout = Layout(prefill, mode="disaggregated", decode_instance=InstanceSpec(CONFIG, num_blocks=512),
                    link=LinkSpec("pcie", bandwidth_bytes_per_s=1e3), kv_bytes_per_token=1.0, num_layers=2)
    env = simpy.Environment()
    cluster = SimCluster(env, layout, FixedCost(0.010))
    chunks = []  # (request id, start, tokens) of every chunk the prefill computed
    cluster.prefills[0].on_batch = lambda batch: chunks.extend(batch.signature())
    requests = [Request(f"r{i}", [100] * 40, SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(3)]
    for request in requests:
        cluster.submit(request)
    env.run()
    restarted = [rid for i, (rid, start, _) in enumerate(chunks) if start == 0 and rid in {c[0] for c in chunks[:i]}]
    assert restarted, f"no prompt was preempted on the prefill: {chunks}"
    # Every chunk computed went over the link, the recomputed ones again: more than the prompts' KV.
    computed_tokens = sum(n for _, _, n in chunks)
    assert computed_tokens > 3 * 40 and cluster.links[0].bytes_moved == computed_tokens * layout.kv_bytes_per_token
    assert [(r.finish_reason, r.num_output_tokens) for r in requests] == [("length", 3)] * 3
    for instance in cluster.instances:
        assert instance.block_manager.num_free_blocks == instance.block_manager.num_blocks
        assert not instance.scheduler.has_unfinished() and not instance.scheduler.held


def test_too_long_request_gets_an_error_record():
    requests = [RequestSpec("long", 0.0, (100,) * 2000, 4), *one_request()]
    records = simulate(requests, disagg(LINKS["ideal"]), FixedCost(D))
    assert records[0].error and not records[0].ok
    assert records[1].ok


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
@pytest.mark.parametrize("dispatch", ["least_loaded", "power_of_two"])
def test_same_seed_same_records(mode, dispatch):
    requests = [RequestSpec(f"req-{i}", i * 0.003, (100,) * (10 + (i * 37) % 200), 1 + (i * 13) % 40)
                for i in range(400)]
    layout = Layout(InstanceSpec(CONFIG, num_blocks=200), mode=mode, num_instances=3, num_prefill=2, num_decode=2,
                    link=LINKS["rdma"], kv_bytes_per_token=131072, num_layers=32, dispatch=dispatch)
    from pdlab.models.presets import PRESETS
    from pdlab.sim import RooflineCost

    cost = RooflineCost(PRESETS["llama3-8b"])
    first = simulate(requests, layout, cost, seed=7)
    second = simulate(requests, layout, cost, seed=7)
    assert first == second
    assert all(r.backend == "sim" and r.mode == mode and r.ok for r in first)
