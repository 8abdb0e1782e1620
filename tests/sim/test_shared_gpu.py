"""Instances that share one GPU time-sliced take turns: their steps never overlap, and together they do no more
work than one instance would."""

from __future__ import annotations

import pytest

from pdlab.policy.devices import gpus_of
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import LINKS, FixedCost, InstanceSpec, Layout, simulate_cluster
from pdlab.workload.workload import RequestSpec

CONFIG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)




def trace(layout: Layout, requests, step_s: float):
    import simpy

    from pdlab.sim.cluster import SimCluster
    from pdlab.sim.run import _arrivals

    env = simpy.Environment()
    cluster = SimCluster(env, layout, FixedCost(step_s), seed=0)
    spans: list[tuple[str, float, float]] = []
    for instance in cluster.instances:
        original = instance.start_step

        def start_step(batch, instance=instance, original=original):
            spans.append((instance.name, env.now, env.now + step_s))
            original(batch)

        instance.start_step = start_step
    env.process(_arrivals(env, cluster, requests, {}, {}))
    env.run()
    return cluster, spans


def requests(n: int, gap_s: float = 0.0):
    return [RequestSpec(f"r{i}", i * gap_s, (7,) * 40, 20) for i in range(n)]


def test_a_prefill_and_a_decode_on_one_time_sliced_gpu_never_step_at_once():
    layout = Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"], gpu_of=(0, 0))
    cluster, spans = trace(layout, requests(30, gap_s=0.003), step_s=0.01)
    names = {name for name, _, _ in spans}
    assert names == {"prefill-0", "decode-0"}  # both worked
    ordered = sorted((start, end) for _, start, end in spans)
    assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(ordered, ordered[1:]))
    # On their own GPUs the same pair overlaps.
    _, apart = trace(Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"]),
                     requests(30, gap_s=0.003), step_s=0.01)
    ordered = sorted((start, end) for _, start, end in apart)
    assert any(a_end > b_start + 1e-9 for (_, a_end), (b_start, _) in zip(ordered, ordered[1:]))


def test_two_replicas_on_one_time_sliced_gpu_saturate_at_one_instances_throughput():
    """All requests at once: the GPU is never idle until the end, so the time is the total of all steps,
    the same whether one instance or two time-sliced replicas run them."""
    step_s = 0.01
    load = requests(64)
    one, _ = trace(Layout(InstanceSpec(CONFIG, 512)), load, step_s)
    two, spans = trace(Layout(InstanceSpec(CONFIG, 512), num_instances=2, gpu_of=(0, 0)), load, step_s)
    end_two = max(end for _, _, end in spans)
    steps_two = sum(i.num_steps for i in two.instances)
    assert end_two == pytest.approx(steps_two * step_s)  # back to back: never idle, never overlapping
    apart, _ = trace(Layout(InstanceSpec(CONFIG, 512), num_instances=2), load, step_s)
    steps_one = one.instances[0].num_steps
    # Two replicas on their own GPUs finish in about half the time; time-sliced, in the time of all their steps.
    assert steps_two == pytest.approx(steps_one, rel=0.05)
    assert end_two == pytest.approx(steps_one * step_s, rel=0.05)


def test_layouts_are_placed_on_gpus_as_real_deployments_are():
    assert gpus_of([1, 1], 1) == [[0], [0]]  # a 1P1D pair on one GPU
    assert gpus_of([1, 1], 2) == [[0], [1]]
    assert gpus_of([2, 2, 2], 4) == [[0, 1], [2, 3], [0, 1]]  # wraps around, sharing
    with pytest.raises(ValueError, match="num_gpus"):
        gpus_of([1], 0)
    with pytest.raises(ValueError, match="gpu_of names 1 GPUs for 2 instances"):
        Layout(InstanceSpec(CONFIG, 512), num_instances=2, gpu_of=(0,))
