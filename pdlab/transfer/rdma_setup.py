"""rdma's set-up: the start-up check, and the messages a prefill and a decode instance exchange on
the decode instance's rdma comm port to connect a queue pair (rdma_sender.py, rdma_receiver.py).

Importable without pyverbs: the check imports it when called, and says why it cannot run.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import struct
from typing import Annotated

import msgspec

from pdlab.transfer.base import TransferError

ENV_NICS = "KVCACHE_RDMA_NICS"  # comma-separated device names, e.g. "mlx5_2,mlx5_3"
IB_PORT = 1
MAX_SETUP_BYTES = 4096
SETUP_TIMEOUT_S = 10.0  # for the TCP exchange, on either side


@contextlib.contextmanager
def keep_root_logging():
    """pyverbs.base calls logging.basicConfig(level=INFO) when imported; undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# --- set-up messages (TCP, rdma comm port) -------------------------------------------------

U24 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 24)]
U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack holds at most 64 bits


class QpEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One end of an RC queue pair: what the other end needs to reach it."""

    qp_num: U24
    psn: U24
    gid: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{4}(:[0-9a-f]{4}){7}$")]  # as pyverbs prints it
    lid: Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)]  # InfiniBand; 0 on RoCE
    mtu: Annotated[int, msgspec.Meta(ge=1, le=5)]  # ibv_mtu: 1 = 256 B ... 5 = 4096 B


class RdmaHello(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Sender -> receiver: the sender's queue pair."""

    qp: QpEndpoint


class RdmaWelcome(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Receiver -> sender: the receiver's queue pair (already in RTS) and the registered KV cache."""

    qp: QpEndpoint
    addr: U64  # where kv[0, 0, 0] is, in the receiver's memory region
    rkey: U32
    length: Annotated[int, msgspec.Meta(ge=1)]  # bytes, the whole [L, 2, N, bs, H, D] cache
    on_gpu: bool  # the region is GPU memory (GPUDirect): the sender ends each flush with a read


class RdmaRefused(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    error: str


SetupMessage = RdmaHello | RdmaWelcome | RdmaRefused
_setup_decoder = msgspec.msgpack.Decoder(SetupMessage)


def encode_setup(message: SetupMessage) -> bytes:
    return msgspec.msgpack.encode(message)


def decode_setup(data: bytes) -> SetupMessage:
    try:
        return _setup_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as err:
        raise TransferError(f"malformed rdma set-up message ({len(data)} bytes): {err}") from None


def send_setup(sock: socket.socket, message: SetupMessage) -> None:
    data = encode_setup(message)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_setup(sock: socket.socket) -> SetupMessage:
    (size,) = struct.unpack("!I", _recv_exactly(sock, 4))
    if size > MAX_SETUP_BYTES:
        raise TransferError(f"rdma set-up message of {size} bytes (at most {MAX_SETUP_BYTES})")
    return decode_setup(_recv_exactly(sock, size))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TransferError("the rdma set-up connection closed mid-message")
        data += chunk
    return data


# --- start-up check ------------------------------------------------------------------------


def parse_nics(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def select_nic(nics: str | None = None, gpu_index: int = 0) -> str:
    """The RDMA device for `gpu_index`: `nics` (default: $KVCACHE_RDMA_NICS, else every device)
    at `gpu_index % len(nics)`, checked to exist with port 1 active. Raises TransferError."""
    try:
        with keep_root_logging():
            device = importlib.import_module("pyverbs.device")
            enums = importlib.import_module("pyverbs.enums")
            errors = importlib.import_module("pyverbs.pyverbs_error")
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "pyverbs":
            raise TransferError("pyverbs is not installed; it ships with the host's rdma-core "
                                "(Debian: python3-pyverbs)") from None
        # e.g. a pyverbs built for another rdma-core than the host's libibverbs (PyPI's pyverbs)
        raise TransferError(f"pyverbs does not import ({err}); it must match the host's rdma-core "
                            "(Debian: python3-pyverbs)") from None
    try:
        devices = [dev.name.decode() for dev in device.get_device_list()]
    except errors.PyverbsError as err:
        raise TransferError(f"no RDMA device: pyverbs.device.get_device_list() failed: {err}") from None
    if not devices:
        raise TransferError("no RDMA device: pyverbs.device.get_device_list() found none")
    names = parse_nics(os.environ.get(ENV_NICS) if nics is None else nics) or devices
    unknown = [n for n in names if n not in devices]
    if unknown:
        raise TransferError(f"{ENV_NICS} names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                            f"not among the devices {', '.join(devices)}")
    name = names[gpu_index % len(names)]
    try:
        ctx = device.Context(name=name)
        try:
            state = ctx.query_port(IB_PORT).state
        finally:
            ctx.close()
    except errors.PyverbsError as err:
        raise TransferError(f"cannot open RDMA device {name}: {err}") from None
    if state != enums.IBV_PORT_ACTIVE:
        raise TransferError(f"RDMA device {name} port {IB_PORT} is not active ({device.port_state_to_str(state)})")
    return name


def check_rdma(nics: str | None = None, gpu_index: int = 0) -> str:
    """For an instance's start-up: the RDMA device `gpu_index` will use, or TransferError saying why none."""
    return select_nic(nics, gpu_index)


def rdma_status(nics: str | None = None, gpu_index: int = 0) -> tuple[bool, str]:
    """(True, device name) when `rdma` can run here, else (False, why not): for an instance's start-up."""
    try:
        return True, select_nic(nics, gpu_index)
    except TransferError as err:
        return False, str(err)
