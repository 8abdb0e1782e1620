"""A simulation reports its progress (requests ended so far) without changing its result."""

import random

import pytest

from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import LINKS, FixedCost, InstanceSpec, Layout, simulate
from pdlab.workload.workload import RequestSpec

CONFIG = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024)


def requests(n: int) -> list[RequestSpec]:
    rng = random.Random(1)
    specs = [RequestSpec(f"r{i}", 0.01 * i, (7,) * rng.randrange(8, 200), rng.randrange(2, 30)) for i in range(n)]
    return specs + [RequestSpec("too-long", 0.5, (7,) * 2000, 8)]  # refused: counts as ended at once


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_progress_counts_every_request_and_changes_nothing(mode):
    layout = Layout(InstanceSpec(CONFIG, num_blocks=256), mode=mode, link=LINKS["nvlink"], kv_bytes_per_token=1e5,
                    num_layers=4, **({"num_instances": 2} if mode == "colocated" else {"num_decode": 2}))
    specs = requests(1500)
    reported: list[int] = []
    with_progress = simulate(specs, layout, FixedCost(0.01), seed=3, progress=reported.append)
    assert with_progress == simulate(specs, layout, FixedCost(0.01), seed=3)
    assert len(reported) > 2, "reported along the way, not only at the end"
    assert reported == sorted(reported) and reported[-1] == len(specs)
