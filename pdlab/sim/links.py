"""KV links: latency + bytes / bandwidth, with the bandwidth shared by concurrent transfers.

A transfer first waits the link's `latency_s` (setup, first byte), then its
bytes flow under processor sharing: while k transfers are active each moves at
bandwidth / k, so a transfer that starts while another is half done slows it
down, and both finish later than either would alone. This is the fair share a
single NIC or NVLink port gives concurrent flows (SplitwiseSim's link has no
contention; DistServe's and Vidur's simulators have no link at all).

Layer-wise overlap with the prefill (what `pdlab/cluster/prefill.py` does by
pushing each layer's KV as it is written) is modelled by the caller, the
prefill instance in `instance.py`: each prompt chunk's KV (chunk tokens x KV
bytes per token) starts on the link when the step computing it starts, and
the prompt's KV counts as delivered at the later of
  (a) the link finishing the bytes of every chunk (shared bandwidth), and
  (b) the last step's end + latency + the last chunk's last layer at full
      bandwidth (that layer is written only at the end of the step).
For a prompt in one step the visible transfer time is therefore
max(latency + one layer's share, latency + bytes/bandwidth - step time): the
research note's "visible ~ max(0, S/BW - T_prefill (L-1)/L)". Treating the
bytes as flowing from the step's start, rather than layer by layer as they are
written, is optimistic only when the link is faster than the prefill writes
KV, where the tail (b) dominates anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import simpy

LinkKind = Literal["nvlink", "pcie", "rdma", "ideal"]


@dataclass(frozen=True)
class LinkSpec:
    kind: LinkKind
    bandwidth_bytes_per_s: float  # math.inf: bytes take no time
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(f"need bandwidth > 0 and latency >= 0, got {self}")

    def alone_s(self, num_bytes: float) -> float:
        """Time of one transfer on an otherwise idle link."""
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


# Defaults from measurements (docs/facts.md has their sources):
# - nvlink: H100 peer copy / IPC kernel 340-395 GB/s at >= 16 MiB; 1 MiB copies reach ~50 GB/s, i.e. ~20 us fixed cost.
# - pcie: Gen5 x16, pinned host<->device 55 GB/s each way.
# - rdma: Mooncake on 8 x 400 Gb/s RoCE (vLLM connector, H800): T = 0.54 ms + S / 144 GB/s.
LINKS: dict[str, LinkSpec] = {
    "nvlink": LinkSpec("nvlink", 370e9, 20e-6),
    "pcie": LinkSpec("pcie", 50e9, 10e-6),
    "rdma": LinkSpec("rdma", 144e9, 0.54e-3),
    "ideal": LinkSpec("ideal", math.inf, 0.0),
}


class Link:
    """One simulated link; `transfer(num_bytes)` returns an event that fires when the bytes have arrived."""

    # A transfer within this many seconds of done is done: float round-off of the
    # clock and the shares must not leave a sliver that never drains.
    EPSILON_S = 1e-9

    def __init__(self, env: simpy.Environment, spec: LinkSpec, name: str = "link") -> None:
        self.env = env
        self.spec = spec
        self.name = name
        self._active: dict[int, list] = {}  # transfer id -> [remaining bytes, done event]
        self._next_id = 0
        self._last_s = env.now
        self._generation = 0  # invalidates completion timers scheduled before the last change
        self.num_transfers = 0
        self.bytes_moved = 0.0

    @property
    def num_active(self) -> int:
        return len(self._active)

    def transfer(self, num_bytes: float) -> simpy.Event:
        done = self.env.event()
        self.num_transfers += 1
        self.bytes_moved += num_bytes
        if self.spec.latency_s > 0:
            self.env.timeout(self.spec.latency_s).callbacks.append(lambda _: self._join(num_bytes, done))
        else:
            self._join(num_bytes, done)
        return done

    def _join(self, num_bytes: float, done: simpy.Event) -> None:
        if num_bytes <= 0 or math.isinf(self.spec.bandwidth_bytes_per_s):
            done.succeed()
            return
        self._advance()
        self._active[self._next_id] = [float(num_bytes), done]
        self._next_id += 1
        self._reschedule()

    def _advance(self) -> None:
        """Take the bytes moved since the last change off every active transfer."""
        now = self.env.now
        if self._active and now > self._last_s:
            moved = self.spec.bandwidth_bytes_per_s * (now - self._last_s) / len(self._active)
            for entry in self._active.values():
                entry[0] -= moved
        self._last_s = now

    def _reschedule(self) -> None:
        self._generation += 1
        if not self._active:
            return
        generation = self._generation
        smallest = min(entry[0] for entry in self._active.values())
        delay = max(0.0, smallest) * len(self._active) / self.spec.bandwidth_bytes_per_s
        self.env.timeout(delay).callbacks.append(lambda _: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._advance()
        epsilon = self.EPSILON_S * self.spec.bandwidth_bytes_per_s
        for key in [k for k, (remaining, _) in self._active.items() if remaining <= epsilon]:
            self._active.pop(key)[1].succeed()
        self._reschedule()
