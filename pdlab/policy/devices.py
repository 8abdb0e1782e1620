"""Which GPUs each instance of a layout takes: one rule for real deployments and the simulator."""

from __future__ import annotations


def gpus_of(tensor_parallel_sizes: list[int], num_gpus: int) -> list[list[int]]:
    """The GPU indices of each instance, in start order, each taking as many consecutive GPUs as its
    tensor-parallel size. When the next instance does not fit in the GPUs left, placement wraps around to
    GPU 0 and instances share GPUs (a prefill and a decode instance on a machine with one GPU)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    placed, next_gpu = [], 0
    for tp in tensor_parallel_sizes:
        if next_gpu + tp > num_gpus:
            next_gpu = 0
        placed.append([(next_gpu + r) % num_gpus for r in range(tp)])
        next_gpu += tp
    return placed
