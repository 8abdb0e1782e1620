"""Instances that share one GPU: time-sliced, their steps progress together at one GPU's speed in all (the
driver's slices are far shorter than a step); under MPS each is capped by its SM limit and together they do
`capacity` GPUs' worth. Either way a layout's instances are placed on GPUs as real deployments are."""

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
    cluster.end_s = env.now
    return cluster, spans


def requests(n: int, gap_s: float = 0.0):
    return [RequestSpec(f"r{i}", i * gap_s, (7,) * 40, 20) for i in range(n)]


def test_a_prefill_and_a_decode_on_one_time_sliced_gpu_do_one_gpus_work_at_most():
    layout = Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"], gpu_of=(0, 0))
    cluster, spans = trace(layout, requests(30, gap_s=0.003), step_s=0.01)
    assert {name for name, _, _ in spans} == {"prefill-0", "decode-0"}  # both worked
    busy = sum(i.num_steps for i in cluster.instances) * 0.01  # the GPU work of every step
    assert cluster.end_s >= busy - 1e-9
    # On their own GPUs the same pair finishes sooner: its steps overlap.
    apart, _ = trace(Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"]),
                     requests(30, gap_s=0.003), step_s=0.01)
    assert apart.end_s < cluster.end_s


def test_two_replicas_on_one_time_sliced_gpu_saturate_at_one_instances_throughput():
    """All requests at once: the GPU is never idle until the end, so the time is the total of all steps,
    the same whether one instance or two time-sliced replicas run them (an M/D/1-like saturation check)."""
    step_s = 0.01
    load = requests(64)
    one, _ = trace(Layout(InstanceSpec(CONFIG, 512)), load, step_s)
    two, _ = trace(Layout(InstanceSpec(CONFIG, 512), num_instances=2, gpu_of=(0, 0)), load, step_s)
    steps_two = sum(i.num_steps for i in two.instances)
    assert two.end_s == pytest.approx(steps_two * step_s)  # never idle, never more than one GPU's work
    apart, _ = trace(Layout(InstanceSpec(CONFIG, 512), num_instances=2), load, step_s)
    steps_one = one.instances[0].num_steps
    # Two replicas on their own GPUs finish in about half the time; time-sliced, in the time of all their steps.
    assert steps_two == pytest.approx(steps_one, rel=0.05)
    assert two.end_s == pytest.approx(steps_one * step_s, rel=0.05)
    assert apart.end_s < 0.6 * two.end_s


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


def test_time_sliced_steps_progress_together_at_one_gpus_speed_whatever_their_limit():
    from pdlab.sim.gpus import TimeSlicedGpu

    # 10 ms and (from 1 ms) 4 ms of work: the first alone for 1 ms, both at half speed until the short one ends
    # at 1 + 8 = 9 ms, then the first alone for its last 5 ms. An SM share means nothing time-sliced.
    assert run_steps(TimeSlicedGpu, [(0.0, 0.010, 0.5), (0.001, 0.004, 1.0)]) == [pytest.approx(0.014),
                                                                                  pytest.approx(0.009)]


def test_the_host_part_of_a_served_step_leaves_the_gpu_to_the_other_instance():
    from pdlab.sim.cost import ServedCost

    layout = Layout(InstanceSpec(CONFIG, 512), num_instances=2, gpu_of=(0, 0))
    load = requests(64)
    gpu_only, _ = trace(layout, load, step_s=0.010)
    import simpy

    from pdlab.sim.cluster import SimCluster
    from pdlab.sim.simulation import _arrivals

    env = simpy.Environment()  # the same steps, 4 ms of each on the host: 6 ms of GPU work a step
    served = SimCluster(env, layout, ServedCost(FixedCost(0.006), overhead_s=0.004), seed=0)
    env.process(_arrivals(env, served, load, {}, {}))
    env.run()
    steps = sum(i.num_steps for i in served.instances)
    assert steps == sum(i.num_steps for i in gpu_only.instances)
    # Each instance's host time overlaps the other's GPU time: sooner than all steps back to back.
    assert env.now < 0.9 * gpu_only.end_s and env.now >= steps * 0.006 - 1e-9


def test_a_simulated_mps_pair_overlaps_its_steps_and_never_exceeds_one_gpus_work():
    layout = Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", link=LINKS["ideal"], gpu_of=(0, 0),
                    gpu_sharing="mps", sm_share=(0.6, 0.4))
    cluster, spans = trace(layout, requests(30, gap_s=0.003), step_s=0.01)
    busy = sum(i.num_steps for i in cluster.instances) * 0.01  # whole-GPU work of every step
    assert max(end for _, _, end in spans) >= busy - 1e-9
    assert all(r.is_finished for i in cluster.entries for r in i.finished)
    with pytest.raises(ValueError, match="sm_share"):
        Layout(InstanceSpec(CONFIG, 512), mode="disaggregated", gpu_of=(0, 0), sm_share=(0.6,))
