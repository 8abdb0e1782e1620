"""The colocated role: prefill and decode on one instance (FastDeploy's `--splitwise-role mixed`)."""

from __future__ import annotations

from pdlab.cluster.frontend import Frontend
from pdlab.cluster.splitwise.wire import Task
from pdlab.policy.request import Request


class Mixed(Frontend):
    """Colocated: prefill and decode on this instance."""

    def admit(self, request: Request, task: Task | None) -> None:
        self.scheduler.add(request)

    def step(self) -> None:
        for out in self.engine.step():
            self.publish(out)
