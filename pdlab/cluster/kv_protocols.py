"""Which KV transfer protocols an instance can use, from its flags and its machine."""

from __future__ import annotations

import argparse
import os

from pdlab.cluster.args import parse_protocols
from pdlab.errors import ConfigError
from pdlab.transfer.base import TransferError


def usable_protocols(args: argparse.Namespace, device: str, splitwise: bool) -> tuple[list[str], list[str]]:
    """The KV protocols this instance can use, preferred first, and notes on those it cannot.

    rdma needs a device (checked now): named alone and missing, it is an error; listed with
    others, they stand in. With the splitwise scheduler, tcp is always offered too: it is what
    two instances on different hosts without a common fast protocol use.
    """
    try:
        asked = parse_protocols(args.cache_transfer_protocol)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    usable, notes = [], []
    sharded = args.tensor_parallel_size > 1 and args.splitwise_role != "mixed"
    for protocol in asked:
        if protocol == "tcp" and sharded:  # rank r writes rank r's KV heads; tcp goes through rank 0 only
            notes.append("tcp cannot move the KV of a tensor-parallel instance (each rank writes its own "
                         "KV heads); it uses ipc or rdma")
            continue
        if protocol == "rdma":
            try:
                _check_rdma(args, device)
            except TransferError as e:
                if len(asked) == 1:
                    raise ConfigError(f"--cache-transfer-protocol rdma: {e}; use tcp (works anywhere) or ipc") from None
                notes.append(f"rdma is not usable here ({e}); using {', '.join(p for p in asked if p != 'rdma')}")
                continue
        if protocol not in usable:
            usable.append(protocol)
    if splitwise and "tcp" not in usable and not sharded:
        usable.append("tcp")
    if not usable:
        raise ConfigError(f"--cache-transfer-protocol {args.cache_transfer_protocol!r}: nothing usable here "
                          f"({'; '.join(notes)})")
    return usable, notes


def _check_rdma(args: argparse.Namespace, device: str) -> None:
    try:
        from pdlab.transfer.rdma_setup import check_rdma
    except ImportError as e:
        raise TransferError(f"the rdma transport cannot be loaded: {e}") from None
    check_rdma(os.environ.get("KVCACHE_RDMA_NICS", ""), _gpu_index(device))


def _gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
