"""The Redis keys of one splitwise scheduler (see the package docstring for what each holds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    topic: str = "fd"  # FastDeploy's default: instances of one deployment share it

    @property
    def cluster(self) -> str:
        return f"{self.topic}.cluster"

    def inbox(self, node_id: str) -> str:
        return f"{self.topic}.inbox.{node_id}"

    def results(self, node_id: str) -> str:
        return f"{self.topic}.results.{node_id}"
