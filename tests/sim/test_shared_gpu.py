"""Instances that share one GPU time-sliced take turns: their steps never overlap, and together they do no more
work than one instance would."""

from __future__ import annotations

import pytest

from pdlab.policy.devices import gpus_of
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import LINKS, FixedCost, InstanceSpec, Layout
from pdlab.workload.workload import RequestSpec

CONFIG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)




def trace(layout: Layout, requests, step_s: float):
    import simpy

    from pdlab.sim.cluster import SimCluster
    from pdlab.sim.simulation import _arrivals

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


def run_steps(gpu_class, steps):
    """Start each (start_s, work_s, share) step on one shared GPU; return each one's end time."""
    import simpy

    env = simpy.Environment()
    gpu = gpu_class(env)
    ends = [None] * len(steps)

    def one(i, start_s, work_s, share):
        yield env.timeout(start_s)
        yield from gpu.run_step(work_s, share, lambda: None)
        ends[i] = env.now

    for i, step in enumerate(steps):
        env.process(one(i, *step))
    env.run()
    return ends


def test_an_mps_step_alone_takes_its_time_scaled_by_its_sm_limit():
    from pdlab.sim.gpus import MpsGpu, sm_speed

    assert run_steps(MpsGpu, [(0.0, 0.010, 1.0)]) == [pytest.approx(0.010)]
    assert run_steps(MpsGpu, [(0.0, 0.010, 0.5)]) == [pytest.approx(0.010 / sm_speed(0.5))]
    with pytest.raises(ValueError, match="SM share"):
        sm_speed(0.0)


def test_the_sm_speed_fit_reproduces_the_engines_steps_profiled_under_mps():
    """data/profiles/mps/ (an H100): the same engine steps alone and at 40% of the SMs, nothing beside."""
    import csv
    from pathlib import Path

    from pdlab.sim.gpus import sm_speed

    def rows(name):
        with (Path(__file__).parents[2] / "data/profiles/mps" / name).open() as f:
            return {(r["phase"], r["num_seqs"], r["context_tokens"]): float(r["step_ms"]) for r in csv.DictReader(f)}

    alone, limited = rows("alone.csv"), rows("sm40_alone.csv")
    for key, ms in alone.items():
        phase, _, tokens = key
        if phase == "prefill" and int(tokens) < 1024:
            continue  # a short prefill is not compute-bound: it lost nothing at 40% either
        predicted = ms / sm_speed(0.4, phase)
        assert predicted == pytest.approx(limited[key], rel=0.15), key
    # Compute-bound steps lose speed with their share, bandwidth-bound decode steps only below 40%.
    assert sm_speed(0.4, "decode") == 1.0 and sm_speed(0.2, "decode") < sm_speed(0.4, "decode")
    assert sm_speed(0.4, "prefill") < sm_speed(0.7, "mixed") < 1.0


def test_concurrent_mps_steps_share_the_gpu_and_one_that_ends_frees_its_part():
    from pdlab.sim.gpus import MpsGpu, sm_speed

    # Two unlimited steps of 10 ms at once: each at half speed, both end at 20 ms (no more work than one GPU does).
    assert run_steps(MpsGpu, [(0.0, 0.010, 1.0), (0.0, 0.010, 1.0)]) == [pytest.approx(0.020)] * 2
    # 4 ms and 10 ms: both at half speed until the short one ends at 8 ms, then the long one alone: 8 + 6 = 14 ms.
    assert run_steps(MpsGpu, [(0.0, 0.004, 1.0), (0.0, 0.010, 1.0)]) == [pytest.approx(0.008), pytest.approx(0.014)]
    # A step limited to 20% runs at sm_speed(0.2) < 0.5 beside another; the other gets the rest of the GPU.
    slow, fast = run_steps(MpsGpu, [(0.0, 0.010, 0.2), (0.0, 0.010, 1.0)])
    rate = sm_speed(0.2)
    assert fast == pytest.approx(0.010 / (1 - rate))
    assert slow == pytest.approx(fast + (0.010 - rate * fast) / rate)


def test_time_sliced_steps_run_one_after_the_other_whatever_their_limit():
    from pdlab.sim.gpus import TimeSlicedGpu

    assert run_steps(TimeSlicedGpu, [(0.0, 0.010, 0.5), (0.001, 0.004, 1.0)]) == [pytest.approx(0.010),
                                                                                  pytest.approx(0.014)]


def test_a_simulated_mps_pair_overlaps_its_steps_and_never_exceeds_one_gpus_work():
    layout = Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"], gpu_of=(0, 0),
                    gpu_sharing="mps", sm_share=(0.6, 0.4))
    cluster, spans = trace(layout, requests(30, gap_s=0.003), step_s=0.01)
    busy = sum(i.num_steps for i in cluster.instances) * 0.01  # whole-GPU work of every step
    assert max(end for _, _, end in spans) >= busy - 1e-9
    assert all(r.is_finished for i in cluster.entries for r in i.finished)
    with pytest.raises(ValueError, match="sm_share"):
        Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", gpu_of=(0, 0), sm_share=(0.6,))
