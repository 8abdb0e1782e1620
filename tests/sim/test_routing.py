"""The two routings of the simulator: innode (decode picks a prefill) and splitwise (a router picks both)."""

from collections import Counter

import pytest

from pdlab.policy.dispatch import FastDeploy, LeastLoaded
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import LINKS, FixedCost, InstanceSpec, Layout, simulate, simulate_cluster
from pdlab.workload.workload import RequestSpec

CONFIG = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192)
BIG = InstanceSpec(CONFIG, num_blocks=4096)


def disagg(routing, num_prefill=2, num_decode=1, spec=BIG, **kw):
    return Layout(spec, mode="disaggregated", num_prefill=num_prefill, num_decode=num_decode, link=LINKS["ideal"],
                  routing=routing, **kw)


def request(i, arrival_s, prompt_tokens, max_tokens=4):
    return RequestSpec(f"req-{i}", arrival_s, (100,) * prompt_tokens, max_tokens)


def test_defaults_and_validation():
    assert disagg("innode").dispatch == "least_loaded"
    assert disagg("splitwise").dispatch == "fastdeploy"
    assert disagg("splitwise", dispatch="round_robin").dispatch == "round_robin"
    with pytest.raises(ValueError, match="routing"):
        disagg("redis")
    with pytest.raises(ValueError, match="heartbeat_s"):
        disagg("innode", heartbeat_s=0.2)
    with pytest.raises(ValueError, match="heartbeat_s"):
        disagg("splitwise", heartbeat_s=-1)


def test_both_routings_run_the_shared_policy_objects():
    _, innode = simulate_cluster([request(0, 0.0, 10)], disagg("innode"), FixedCost(0.01))
    _, splitwise = simulate_cluster([request(0, 0.0, 10)], disagg("splitwise"), FixedCost(0.01))
    assert isinstance(innode.prefill_policy, LeastLoaded) and innode.router is None
    assert isinstance(splitwise.router.prefill_policy, FastDeploy)
    assert isinstance(splitwise.router.decode_policy, FastDeploy)


def test_splitwise_balances_prompt_tokens_where_innode_balances_tasks():
    # A burst at t=0 alternating long and short prompts. The decode instance reserves them all at once;
    # innode's least-outstanding-tasks then alternates prefills, so every long prompt lands on one of
    # them. The splitwise router compares prompt tokens in flight and splits the tokens evenly.
    burst = [request(i, 0.0, 2000 if i % 2 == 0 else 100) for i in range(20)]
    tokens = {}
    for routing in ("innode", "splitwise"):
        _, cluster = simulate_cluster(burst, disagg(routing), FixedCost(0.01), seed=3)
        tokens[routing] = [p.num_task_tokens for p in cluster.prefills]
        assert sum(p.num_tasks for p in cluster.prefills) == 20
    assert sorted(tokens["innode"]) == [10 * 100, 10 * 2000]
    low, high = sorted(tokens["splitwise"])
    assert high / low < 1.25, tokens["splitwise"]


def test_stale_heartbeats_keep_a_burst_off_a_prefill_that_has_gone_idle():
    # A long prompt at t=0, done by t=0.02; a burst of short ones at t=0.5. With live loads the burst
    # spreads over both (idle) prefills; with heartbeats 1 s apart the router still counts the long
    # prompt it sent (the t=0 heartbeat predates it), so the burst avoids that prefill entirely.
    requests = [request(0, 0.0, 4000), *[request(i, 0.5, 100) for i in range(1, 11)]]
    burst_on = {}
    for heartbeat_s in (0.0, 1.0):
        _, cluster = simulate_cluster(requests, disagg("splitwise", heartbeat_s=heartbeat_s), FixedCost(0.01))
        first = next(p for p in cluster.prefills if p.num_task_tokens >= 4000)
        burst_on[heartbeat_s] = first.num_tasks - 1
        if heartbeat_s:
            assert cluster.router.num_heartbeats == 1  # the heartbeats stopped with the arrivals
    assert burst_on[1.0] == 0
    assert burst_on[0.0] >= 3


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
@pytest.mark.parametrize("heartbeat_s", [0.0, 0.05])
def test_splitwise_finishes_every_request_without_leaks(mode, heartbeat_s):
    # A tight cache: remote requests queue at the decode instances, waiting for blocks, before dispatch.
    small = InstanceSpec(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512),
                         num_blocks=48, block_size=16)
    requests = [request(i, i * 0.004, 20 + (i * 37) % 300, 1 + (i * 13) % 40) for i in range(400)]
    layout = Layout(small, mode=mode, num_instances=3, num_prefill=3, num_decode=2, link=LINKS["pcie"],
                    kv_bytes_per_token=1e5, num_layers=4, routing="splitwise", heartbeat_s=heartbeat_s)
    records, cluster = simulate_cluster(requests, layout, FixedCost(0.01), seed=1)
    assert all(r.ok and r.num_output_tokens == s.max_tokens for r, s in zip(records, requests))
    for instance in cluster.instances:
        assert instance.block_manager.num_free_blocks == instance.block_manager.num_blocks
        assert not instance.scheduler.has_unfinished() and not instance.scheduler.held
        assert instance.num_steps > 0
    assert not cluster._prefill_of  # every routed prefill task was dispatched


@pytest.mark.parametrize("dispatch", ["fastdeploy", "power_of_two", "least_loaded"])
def test_splitwise_same_seed_same_records(dispatch):
    requests = [request(i, i * 0.003, 10 + (i * 37) % 200, 1 + (i * 13) % 40) for i in range(300)]
    layout = disagg("splitwise", num_prefill=3, num_decode=2, dispatch=dispatch, heartbeat_s=0.02,
                    spec=InstanceSpec(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512,
                                                      max_model_len=512), num_blocks=200))
    first = simulate(requests, layout, FixedCost(0.01), seed=7)
    assert first == simulate(requests, layout, FixedCost(0.01), seed=7)
    assert all(r.ok for r in first)


def test_the_seed_moves_fastdeploys_random_choices():
    burst = [request(i, 0.0, 100) for i in range(40)]

    def placement(seed):
        _, cluster = simulate_cluster(burst, disagg("splitwise", num_prefill=4), FixedCost(0.01), seed=seed)
        return tuple(p.num_tasks for p in cluster.prefills)

    assert placement(0) == placement(0)
    assert len({placement(seed) for seed in range(5)}) > 1


def test_a_refused_request_leaves_no_trace_in_the_router():
    requests = [request(0, 0.0, 9000), request(1, 0.0, 10)]  # the first is longer than max_model_len
    records, cluster = simulate_cluster(requests, disagg("splitwise", heartbeat_s=0.1), FixedCost(0.01))
    assert records[0].error and records[1].ok
    assert not cluster._prefill_of
    assert Counter(p.num_tasks for p in cluster.prefills) == Counter({0: 1, 1: 1})
