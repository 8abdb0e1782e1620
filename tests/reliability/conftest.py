"""Fixtures of the reliability suite: the cluster, api_server and Redis fixtures of the other packages,
and what every test here measures (a burst's outcome, an instance's memory).

Every process a test starts goes through `cluster`/`module_cluster` (instances), `servers` (api_servers)
or `redis_server`/`redis_servers` (Redis), which stop them at teardown.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import psutil
import pytest

from pdlab.cluster.client import ping
from pdlab.cluster.messages import Pong
from tests.cluster.conftest import (  # noqa: F401
    ENV, Cluster, Pair, cluster, instance_args, is_idle, module_cluster, short_request,
)
from tests.cluster.splitwise.conftest import (  # noqa: F401
    EXPIRE_S, HEARTBEAT_S, Hosts, RedisServer, hosts, network_hosts, new_topic, node_ids, redis_server, redis_servers,
    splitwise_args, wait_nodes,
)
from tests.entrypoints.conftest import ApiServer, Servers, module_servers, servers  # noqa: F401


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB (0 if it is gone)."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def wait_idle(endpoints: dict[str, str], timeout_s: float, logs=lambda: "") -> dict[str, Pong]:
    """Poll until every instance (name -> endpoint) answers with all blocks free and nothing queued."""
    deadline = time.monotonic() + timeout_s
    while True:
        pongs = {name: ping(endpoint, timeout_s=1.0) for name, endpoint in endpoints.items()}
        if all(p is not None and is_idle(p) for p in pongs.values()):
            return pongs
        if time.monotonic() > deadline:
            pytest.fail(f"not idle after {timeout_s:.0f} s (leaked blocks or requests): {pongs}\n{logs()}")
        time.sleep(0.05)


def report(name: str, numbers: dict) -> None:
    """What a test measured: printed (pytest -s shows it) and, with $PDLAB_RELIABILITY_REPORT set, appended to
    that file as one JSON line (docs/reliability.md quotes these)."""
    line = json.dumps({"test": name, **numbers}, sort_keys=True)
    print(f"\nmeasured: {line}")
    path = os.environ.get("PDLAB_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture
def three_hosts() -> Iterator[Hosts]:
    """Three "machines" (network namespaces on one bridge)."""
    with network_hosts(3) as made:
        yield made
