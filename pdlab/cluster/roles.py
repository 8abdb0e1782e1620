"""The roles an instance can take: the `Role` every one derives, and each role's class by FastDeploy's
`--splitwise-role` name (`role_class`): `mixed` (mixed.py), `prefill` (prefill.py), `decode` (decode.py)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdlab.cluster.instance import Instance

log = logging.getLogger("pdlab.instance")


class Role:
    """The default for every hook: ignore. Roles override what they handle."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.engine = instance.engine
        self.scheduler = instance.engine.scheduler
        self.metrics = instance.metrics

    def on_ewq(self, identity: bytes, message) -> None:
        log.warning("%s: unexpected %s on the engine-worker-queue port", self.instance.instance_id, type(message).__name__)

    def on_cache(self, identity: bytes, message, rest) -> None:
        log.warning("%s: unexpected %s on the cache-queue port", self.instance.instance_id, type(message).__name__)

    def on_task(self, task) -> None:
        """A task from the splitwise scheduler's inbox (decode and mixed instances only)."""
        log.warning("%s: a %s instance got a splitwise task (%s); dropped", self.instance.instance_id,
                    self.instance.role, task.request_id)

    def tick(self, now_s: float) -> None:
        pass

    def on_scheduler_restarted(self) -> None:
        """The splitwise scheduler's Redis came back empty: tasks and updates in its lists are lost."""

    def sockets(self) -> dict:
        """Extra sockets the instance loop should poll: {socket: handler(identity, message, rest)}."""
        return {}

    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


def role_class(name: str) -> type[Role]:
    """The class of the role named `name` ("mixed", "prefill" or "decode"), imported when asked for."""
    if name == "mixed":
        from pdlab.cluster.mixed import Mixed

        return Mixed
    if name == "prefill":
        from pdlab.cluster.prefill import Prefill

        return Prefill
    if name == "decode":
        from pdlab.cluster.decode import Decode

        return Decode
    raise ValueError(f"unknown role {name!r}; choose mixed, prefill or decode")
