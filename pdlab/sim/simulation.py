"""Run a request list through a simulated deployment; get the same records a real run writes.

    records = simulate(make_workload(spec, vocab_size, seed), layout, RooflineCost(model), seed)

Each `RequestSpec` arrives at its `arrival_s` on the simulated clock, runs to
its `max_tokens` (as a benchmark request with `ignore_eos` does), and becomes
one `RequestRecord` with `backend="sim"` whose times are simulated seconds
from the start. A request the scheduler refuses (prompt plus output longer
than `max_model_len`) gets a record with `error` set. A run is a pure function
of its arguments: SimPy breaks event ties by insertion order and the only
random choices (the `power_of_two` and `fastdeploy` policies) draw from `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import simpy

from pdlab.metrics.records import RequestRecord
from pdlab.policy.request import Request
from pdlab.sampling_params import SamplingParams
from pdlab.sim.cluster import Layout, SimCluster
from pdlab.sim.cost import CostModel
from pdlab.workload.workload import RequestSpec


Progress = Callable[[int], None]  # called now and then with the number of requests ended so far
EVENTS_PER_REPORT = 1000


def simulate(
    requests: Sequence[RequestSpec], layout: Layout, cost: CostModel | None, seed: int = 0,
    until_s: float | None = None, progress: Progress | None = None,
) -> list[RequestRecord]:
    """Simulate `requests` on `layout`; one record per request, in the order given.

    `until_s` stops the clock early (requests still in flight get records
    without a finish time); by default the run goes until every request ends.
    `progress(num_ended)` is called every thousand events (and at the end;
    only at the end with `until_s`), e.g. a progress bar's update; it does not
    change the run.
    """
    records, _ = simulate_cluster(requests, layout, cost, seed, until_s, progress)
    return records


def simulate_cluster(
    requests: Sequence[RequestSpec], layout: Layout, cost: CostModel | None, seed: int = 0,
    until_s: float | None = None, progress: Progress | None = None,
) -> tuple[list[RequestRecord], SimCluster]:
    """`simulate`, also returning the cluster (instances, links, step counts) for inspection."""
    env = simpy.Environment()
    cluster = SimCluster(env, layout, cost, seed)
    objects: dict[str, Request] = {}
    errors: dict[str, str] = {}
    env.process(_arrivals(env, cluster, requests, objects, errors))
    if progress is None or until_s is not None:
        env.run(until=until_s)
    else:  # env.run(), one event at a time
        num_events = 0
        while env.peek() < math.inf:
            env.step()
            num_events += 1
            if num_events % EVENTS_PER_REPORT == 0:
                progress(len(errors) + sum(len(e.finished) for e in cluster.entries))
    if progress is not None:
        progress(len(errors) + sum(len(e.finished) for e in cluster.entries))
    return [_record(spec, objects.get(spec.request_id), errors.get(spec.request_id), layout.mode)
            for spec in requests], cluster


def _arrivals(env: simpy.Environment, cluster: SimCluster, requests: Sequence[RequestSpec],
              objects: dict[str, Request], errors: dict[str, str]):
    params: dict[int, SamplingParams] = {}
    for spec in sorted(requests, key=lambda s: s.arrival_s):
        if spec.arrival_s > env.now:
            yield env.timeout(spec.arrival_s - env.now)
        if spec.max_tokens not in params:
            params[spec.max_tokens] = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
        request = Request(spec.request_id, list(spec.prompt_token_ids), params[spec.max_tokens],
                          arrival_time_s=spec.arrival_s)
        try:
            yield cluster.submit(request)
        except ValueError as e:  # too long for max_model_len, or a duplicate id
            errors[spec.request_id] = str(e)
            continue
        objects[spec.request_id] = request
    cluster.close()


def _record(spec: RequestSpec, request: Request | None, error: str | None, mode: str) -> RequestRecord:
    if request is None:
        return RequestRecord(spec.request_id, "sim", mode, spec.arrival_s, None, None, spec.num_prompt_tokens, 0,
                             "error", (), error or "never arrived (the run stopped first)")
    return RequestRecord(
        request_id=spec.request_id,
        backend="sim",
        mode=mode,
        arrival_s=spec.arrival_s,
        first_token_s=request.first_token_time_s,
        finish_s=request.finish_time_s,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        finish_reason=request.finish_reason,
        token_times_s=tuple(request.token_times_s),
    )
