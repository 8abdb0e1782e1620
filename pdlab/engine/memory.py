"""How much memory one instance's KV cache gets, counted from the instance's own allocations.

Several instances may share a GPU (a prefill and a decode instance on one card). Each
instance's `gpu_memory_utilization` is its share of the card: what it holds (the CUDA
context, its weights, the KV cache and a reserve for activations) must fit in
`share * total`. What the *card* has in use (`total - free`) would charge the other
instances' memory to this one: the second instance to start on a shared card got no KV
cache at all. So the instance counts what PyTorch's allocator holds for it, plus an
estimate of its CUDA context; and never more than is free now, so that shares that add
up to more than the card fail with the numbers instead of running out of memory later.
Weights mapped from another process (`pdlab.engine.shared_weights`) are that process's
memory, not this one's.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
# Activations, logits and CUDA graph pools of one step at the token budget.
ACTIVATION_RESERVE_BYTES = 2 * GiB
# The CUDA context and the kernels' modules (cuBLAS, Triton), outside PyTorch's allocator:
# ~0.5-0.6 GiB on an H100 with torch 2.11 and CUDA 13 (less under MPS); rounded up.
CUDA_CONTEXT_BYTES = 3 * GiB // 4


@dataclass(frozen=True)
class MemoryPlan:
    """One instance's part of its GPU, in bytes; `kv_cache_bytes` is what is left for the KV cache."""

    total_bytes: int  # the card
    free_bytes: int  # free on the card when the plan was made (other processes' memory excluded)
    share: float  # gpu_memory_utilization
    own_bytes: int  # what PyTorch holds for this process (its weights) before the KV cache
    mapped_bytes: int = 0  # weights mapped from another process on the same GPU
    reserve_bytes: int = ACTIVATION_RESERVE_BYTES
    context_bytes: int = CUDA_CONTEXT_BYTES

    @property
    def share_bytes(self) -> int:
        return int(self.total_bytes * self.share)

    @property
    def _within_share_bytes(self) -> int:
        return self.share_bytes - self.own_bytes - self.context_bytes - self.reserve_bytes

    @property
    def _within_free_bytes(self) -> int:
        return self.free_bytes - self.reserve_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return max(0, min(self._within_share_bytes, self._within_free_bytes))

    @property
    def limited_by_free(self) -> bool:
        """True when the card had less free than the share allowed (other instances took it)."""
        return self._within_free_bytes < self._within_share_bytes

    def min_share(self, kv_bytes: int) -> float:
        """The smallest gpu_memory_utilization that leaves `kv_bytes` for the KV cache."""
        return (self.own_bytes + self.context_bytes + self.reserve_bytes + kv_bytes) / self.total_bytes

    def describe(self) -> str:
        """One line: how this instance's share is split."""
        weights = f"weights {self.own_bytes / GiB:.2f} GiB"
        if self.mapped_bytes:
            weights += f" own + {self.mapped_bytes / GiB:.2f} GiB mapped from another instance"
        text = (f"GPU memory: share {self.share:g} of {self.total_bytes / GiB:.1f} GiB = {self.share_bytes / GiB:.1f} GiB: "
                f"{weights}, CUDA context ~{self.context_bytes / GiB:.2f} GiB, activations {self.reserve_bytes / GiB:.1f} "
                f"GiB, KV cache {self.kv_cache_bytes / GiB:.2f} GiB")
        if self.limited_by_free:
            text += f" (capped by the {self.free_bytes / GiB:.1f} GiB free on the card)"
        return text

    def too_small(self, need_bytes: int, what: str) -> str:
        """The error when the KV cache cannot hold `need_bytes` (`what` says what needs them)."""
        head = (f"--gpu-memory-utilization {self.share:g} gives this instance {self.share_bytes / GiB:.1f} GiB of the "
                f"card's {self.total_bytes / GiB:.1f} GiB; its weights take {self.own_bytes / GiB:.1f} GiB, activations "
                f"{self.reserve_bytes / GiB:.1f} GiB and the CUDA context ~{self.context_bytes / GiB:.2f} GiB, leaving "
                f"{self.kv_cache_bytes / GiB:.2f} GiB of KV cache, less than {what} needs ({need_bytes / GiB:.2f} GiB)")
        if self.limited_by_free:
            return (f"{head}: only {self.free_bytes / GiB:.1f} GiB of the card is free (other processes hold the rest); "
                    f"give the instances shares that add up to at most 1, or lower max_model_len")
        return f"{head}: raise it to at least {self.min_share(need_bytes):.2f} or lower max_model_len"
