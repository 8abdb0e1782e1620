"""The KV transports of one instance, on every tensor-parallel rank, driven from rank 0.

A prefill instance's role opens a sender per decode instance, lists each
step's pushes (which local blocks go to which remote blocks, for which
request), flushes a request's writes before it reports the first token, and
closes senders; a decode instance's role opens a receiver per protocol and
commits a request's blocks when its KV has landed. Each of these runs on
every rank: rank r holds its KV heads and writes them into (or exposes them
as) rank r of the other instance, so the roles read the same with one rank
or eight. Calls travel as `parallel.CALL` messages whose payloads are msgspec
structs (never pickle); each rank's answer (an error, or its receiver's
fields) is gathered back to rank 0.

Over `tcp` the KV goes through rank 0's control socket: only one rank can
use it, and a tensor-parallel instance refuses it with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from pdlab.models.kv_cache import KVCache
from pdlab.transfer import make_receiver, make_sender
from pdlab.transfer.base import KVReceiver, KVSender, TransferError
from pdlab.transfer.descriptor import KVDescriptor, KVRank

if TYPE_CHECKING:
    from pdlab.models.parallel import TensorParallel


@dataclass(frozen=True)
class Push:
    """Copy one scheduled chunk's KV, each layer as soon as it is written: local blocks -> remote blocks."""

    request_id: str
    sender: int
    src_block_ids: list[int]
    dst_block_ids: list[int]


class _OpenSender(msgspec.Struct, frozen=True):
    sender: int
    kv: KVDescriptor


class _Flush(msgspec.Struct, frozen=True):
    sender: int
    request_id: str


class _OpenReceiver(msgspec.Struct, frozen=True):
    protocol: str
    rdma_ports: list[int]
    host: str
    advertise_host: str


class _Commit(msgspec.Struct, frozen=True):
    protocol: str
    block_ids: list[int]


_rank_fields = tuple(f.name for f in msgspec.structs.fields(KVRank))


class KVTransfers:
    def __init__(self, kv_cache: KVCache, tp: TensorParallel | None = None) -> None:
        self.kv_cache = kv_cache
        self.tp = tp
        self.rank = tp.rank if tp is not None else 0
        self.senders: dict[int, KVSender] = {}
        self.receivers: dict[str, KVReceiver] = {}
        self.errors: dict[str, str] = {}  # request id -> its first failed send (reported by `flush`)
        self._next_sender = 0
        self._socket = None  # rank 0's control socket for the sender being opened
        self.handlers = {"open_sender": self._open_sender, "flush": self._flush, "close_sender": self._close_sender,
                         "open_receiver": self._open_receiver, "commit": self._commit}

    @property
    def size(self) -> int:
        return self.tp.size if self.tp is not None else 1

    # --- rank 0 ---------------------------------------------------------------------------------

    def open_sender(self, kv: KVDescriptor, socket) -> int:
        """A sender (on every rank) to the decode instance `kv` describes; TransferError if any rank cannot."""
        sender = self._next_sender
        self._next_sender += 1
        self._socket = socket
        errors = [e for e in self._call("open_sender", msgspec.msgpack.encode(_OpenSender(sender, kv))) if e]
        if errors:
            self.close_sender(sender)
            raise TransferError(errors[0].decode())
        return sender

    def flush(self, sender: int, request_id: str) -> None:
        """Return once every rank's writes queued so far have landed; TransferError if any of
        `request_id`'s failed (on any rank)."""
        errors = [e for e in self._call("flush", msgspec.msgpack.encode(_Flush(sender, request_id))) if e]
        if errors:
            raise TransferError(errors[0].decode())

    def close_sender(self, sender: int) -> None:
        self._call("close_sender", sender.to_bytes(8, "little"))

    def open_receiver(self, protocol: str, rdma_ports: list[int], host: str, advertise_host: str) -> list[KVRank]:
        """A receiver on every rank; what a prefill needs to reach each one (rank order)."""
        payload = msgspec.msgpack.encode(_OpenReceiver(protocol, rdma_ports, host, advertise_host))
        answers = [msgspec.msgpack.decode(a) for a in self._call("open_receiver", payload)]
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            raise TransferError(errors[0])
        return [KVRank(**a) for a in answers]

    def commit(self, protocol: str, block_ids: list[int]) -> None:
        """A request's KV has landed: make its blocks readable on every rank (see `KVReceiver.commit`)."""
        errors = [e for e in self._call("commit", msgspec.msgpack.encode(_Commit(protocol, block_ids))) if e]
        if errors:
            raise TransferError(errors[0].decode())

    def receiver(self, protocol: str) -> KVReceiver | None:
        """Rank 0's receiver (the one tcp frames are written through)."""
        return self.receivers.get(protocol)

    def close(self) -> None:
        for sender in list(self.senders):
            self.close_sender(sender)
        for receiver in self.receivers.values():
            receiver.close()
        self.receivers.clear()

    def _call(self, name: str, payload: bytes) -> list[bytes]:
        if self.tp is None:
            return [self.handlers[name](payload)]
        from pdlab.models.parallel import CALL, CALLS

        self.tp.broadcast_ints([CALL, CALLS.index(name), *payload])
        return self.tp.all_gather_bytes(self.handlers[name](payload))

    # --- every rank -------------------------------------------------------------------------------

    def push_layer(self, layer: int, pushes: list[Push]) -> None:
        """Inside the forward pass, right after `layer`'s K and V are written: queue their copies."""
        for push in pushes:
            sender = self.senders.get(push.sender)
            if sender is None or push.request_id in self.errors:
                continue
            try:
                sender.send_layer(push.request_id, layer, push.src_block_ids, push.dst_block_ids)
            except TransferError as e:  # the request fails at its flush; no token from partial KV
                self.errors[push.request_id] = str(e)

    def _open_sender(self, payload: bytes) -> bytes:
        msg = msgspec.msgpack.decode(payload, type=_OpenSender)
        kv = msg.kv
        try:
            if kv.tensor_parallel_size != self.size:
                raise TransferError(f"decode instance {kv.instance_id} has tensor-parallel size "
                                    f"{kv.tensor_parallel_size}, this prefill instance {self.size}; "
                                    "they must be equal (rank r sends to rank r)")
            if kv.protocol == "tcp" and self.size > 1:
                raise TransferError("KV over tcp goes through rank 0 only: tensor-parallel instances use ipc or rdma")
            self.senders[msg.sender] = make_sender(kv.protocol, self.kv_cache, kv.for_rank(self.rank),
                                                   self._socket if self.rank == 0 else None)
        except (TransferError, ValueError) as e:
            return f"rank {self.rank}: {e}".encode() if self.size > 1 else str(e).encode()
        return b""

    def _flush(self, payload: bytes) -> bytes:
        msg = msgspec.msgpack.decode(payload, type=_Flush)
        error = self.errors.pop(msg.request_id, None)
        sender = self.senders.get(msg.sender)
        try:
            if sender is not None:
                sender.flush()
        except TransferError as e:
            error = error or str(e)
        return b"" if error is None else error.encode()

    def _close_sender(self, payload: bytes) -> bytes:
        sender = self.senders.pop(int.from_bytes(payload, "little"), None)
        if sender is not None:
            try:
                sender.close()
            except TransferError:
                pass
        return b""

    def _open_receiver(self, payload: bytes) -> bytes:
        msg = msgspec.msgpack.decode(payload, type=_OpenReceiver)
        try:
            if msg.protocol == "tcp" and self.size > 1:
                raise TransferError("KV over tcp goes through rank 0 only: tensor-parallel instances use ipc or rdma")
            options = {}
            if msg.protocol == "rdma":  # one --rdma-comm-ports port per GPU
                gpu = self.kv_cache.kv.device.index or 0
                ports = msg.rdma_ports
                options = dict(port=ports[gpu % len(ports)] if ports else 0, host=msg.host,
                               advertise_host=msg.advertise_host, gpu_index=gpu)
            receiver = self.receivers[msg.protocol] = make_receiver(msg.protocol, self.kv_cache, **options)
            fields = receiver.descriptor_fields()
        except (TransferError, ValueError) as e:
            return msgspec.msgpack.encode({"error": f"rank {self.rank}: {e}" if self.size > 1 else str(e)})
        return msgspec.msgpack.encode({f: fields[f] for f in _rank_fields if f in fields})

    def _commit(self, payload: bytes) -> bytes:
        msg = msgspec.msgpack.decode(payload, type=_Commit)
        try:
            self.receivers[msg.protocol].commit(msg.block_ids)
        except TransferError as e:
            return str(e).encode()
        return b""
