"""The `rdma` transport's set-up (pdlab/transfer/rdma_setup.py): the start-up check that says in one line why
rdma cannot run here, and the messages a prefill and a decode instance exchange to connect a queue pair.

No machine of this project has an RDMA device: fake `pyverbs` modules stand in for one in the start-up check.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import subprocess
import sys
import types

import msgspec
import pytest
import torch

from pdlab.models.kv_cache import KVCache
from pdlab.models.presets import PRESETS
from pdlab.transfer import make_receiver, rdma_setup, rdma_status
from pdlab.transfer.base import TransferError
from pdlab.transfer.rdma_setup import QpEndpoint, RdmaHello, RdmaRefused, RdmaWelcome, decode_setup, encode_setup

CONFIG = PRESETS["tiny"]
BLOCK_SIZE = 16
HAVE_PYVERBS = importlib.util.find_spec("pyverbs") is not None
NOT_INSTALLED = "pyverbs is not installed; it ships with the host's rdma-core (Debian: python3-pyverbs)"
NO_DEVICE = "no RDMA device: pyverbs.device.get_device_list() failed: Failed to get devices list"
RDMA_OK, RDMA_WHY = rdma_status()
needs_rdma = pytest.mark.skipif(not RDMA_OK, reason=f"needs an RDMA device: {RDMA_WHY}")


# --- the start-up check ------------------------------------------------------------------------------


class FakeVerbsError(Exception):
    pass


def install_fake_pyverbs(monkeypatch, devices=None, list_error=None, port_state=4, import_error=None):
    """Fake `pyverbs.device/enums/pyverbs_error` modules in sys.modules (what `rdma_setup.select_nic` imports)."""
    if import_error is not None:
        for name in ("pyverbs", "pyverbs.device", "pyverbs.enums", "pyverbs.pyverbs_error"):
            monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
        return

    def get_device_list():
        if list_error is not None:
            raise FakeVerbsError(list_error)
        return [types.SimpleNamespace(name=name.encode()) for name in devices]

    class Context:
        def __init__(self, name):
            self.name = name

        def query_port(self, port):
            return types.SimpleNamespace(state=port_state)

        def close(self):
            pass

    device = types.ModuleType("pyverbs.device")
    device.get_device_list, device.Context = get_device_list, Context
    device.port_state_to_str = lambda state: {1: "Down (1)", 4: "Active (4)"}[state]
    enums = types.ModuleType("pyverbs.enums")
    enums.IBV_PORT_ACTIVE = 4
    errors = types.ModuleType("pyverbs.pyverbs_error")
    errors.PyverbsError = FakeVerbsError
    for name, module in {"pyverbs": types.ModuleType("pyverbs"), "pyverbs.device": device, "pyverbs.enums": enums,
                         "pyverbs.pyverbs_error": errors}.items():
        monkeypatch.setitem(sys.modules, name, module)


def assert_one_line(ok: bool, reason: str, expected: str) -> None:
    assert not ok
    assert reason == expected
    assert "\n" not in reason and "Traceback" not in reason


def test_without_pyverbs_the_check_says_how_to_install_it(monkeypatch):
    install_fake_pyverbs(monkeypatch, import_error=True)
    assert_one_line(*rdma_status(), NOT_INSTALLED)


@pytest.mark.skipif(HAVE_PYVERBS, reason="pyverbs is installed here")
def test_without_pyverbs_installed_the_check_and_the_transport_say_so():
    assert_one_line(*rdma_status(), NOT_INSTALLED)
    cache = KVCache(CONFIG, 4, BLOCK_SIZE, torch.float32, "cpu")
    with pytest.raises(TransferError, match="pyverbs is not installed"):
        make_receiver("rdma", cache)


def test_a_pyverbs_that_does_not_load_is_not_called_missing(monkeypatch):
    def broken(name, *args, **kwargs):
        raise ImportError("libibverbs.so.1: version `IBVERBS_1.14' not found")

    monkeypatch.setattr(rdma_setup, "importlib", types.SimpleNamespace(import_module=broken))
    ok, reason = rdma_status()
    assert not ok and reason.startswith("pyverbs does not import (libibverbs.so.1: version") and "rdma-core" in reason


def test_without_devices_the_check_says_so(monkeypatch):
    install_fake_pyverbs(monkeypatch, list_error="Failed to get devices list")
    assert_one_line(*rdma_status(), NO_DEVICE)
    install_fake_pyverbs(monkeypatch, devices=[])
    assert_one_line(*rdma_status(), "no RDMA device: pyverbs.device.get_device_list() found none")


@pytest.mark.skipif(not HAVE_PYVERBS or RDMA_OK, reason="needs pyverbs installed on a host without RDMA devices")
def test_real_pyverbs_without_devices_fails_with_a_clear_message():
    """What this project's machines do: the kernel or the hardware has no RDMA device."""
    ok, reason = rdma_status()
    assert_one_line(ok, reason, NO_DEVICE)
    cache = KVCache(CONFIG, 4, BLOCK_SIZE, torch.float32, "cpu")
    with pytest.raises(TransferError) as err:
        make_receiver("rdma", cache, port=0)
    assert str(err.value) == reason


def test_unknown_nic_names_are_named_with_the_devices_there_are(monkeypatch):
    install_fake_pyverbs(monkeypatch, devices=["mlx5_0", "mlx5_1"])
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "mlx5_9")
    assert_one_line(*rdma_status(), "KVCACHE_RDMA_NICS names mlx5_9, which is not among the devices mlx5_0, mlx5_1")
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "mlx5_0, mlx5_7,mlx5_8")
    assert_one_line(*rdma_status(), "KVCACHE_RDMA_NICS names mlx5_7, mlx5_8, which are not among the devices "
                                    "mlx5_0, mlx5_1")


@needs_rdma
def test_a_real_nic_name_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "pdlab_no_such_nic")
    ok, reason = rdma_status()
    assert not ok and reason.startswith("KVCACHE_RDMA_NICS names pdlab_no_such_nic, which is not among the devices ")


def test_the_nic_is_picked_by_gpu_index_as_fastdeploy_does(monkeypatch):
    install_fake_pyverbs(monkeypatch, devices=["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"])
    monkeypatch.setenv("KVCACHE_RDMA_NICS", "mlx5_2,mlx5_3")
    assert [rdma_status(gpu_index=g) for g in range(4)] == [(True, n) for n in ["mlx5_2", "mlx5_3"] * 2]
    assert rdma_status("mlx5_1") == (True, "mlx5_1")  # an explicit list wins over the variable
    monkeypatch.delenv("KVCACHE_RDMA_NICS")
    assert rdma_status(gpu_index=5) == (True, "mlx5_1")  # unset: every device, in order
    assert rdma_setup.check_rdma("", 2) == "mlx5_2"  # what an instance calls: empty, as unset
    with pytest.raises(TransferError, match="KVCACHE_RDMA_NICS names mlx5_9, which is not among"):
        rdma_setup.check_rdma("mlx5_9", 0)


def test_a_port_that_is_down_is_reported(monkeypatch):
    install_fake_pyverbs(monkeypatch, devices=["mlx5_0"], port_state=1)
    assert_one_line(*rdma_status(), "RDMA device mlx5_0 port 1 is not active (Down (1))")


@pytest.mark.skipif(not HAVE_PYVERBS, reason="needs pyverbs")
def test_importing_pyverbs_leaves_logging_alone():
    """pyverbs.base calls logging.basicConfig(level=INFO) on import; an instance's own logging must win."""
    code = ("import logging, pdlab.transfer.rdma_sender as r; assert r.PyverbsError != (); "
            "root = logging.getLogger(); assert not root.handlers and root.level == logging.WARNING, root.handlers")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


# --- set-up messages ---------------------------------------------------------------------------------

QP = QpEndpoint(qp_num=0x1234, psn=0xABCDEF, gid="fe80:0000:0000:0000:0202:c9ff:fe00:0001", lid=7, mtu=5)
SETUP_EXAMPLES = [
    RdmaHello(QP),
    RdmaWelcome(QP, addr=0x7F00_0000_1000, rkey=0xFFFF_FFFF, length=1 << 34, on_gpu=True),
    RdmaRefused("cannot create a QP: Cannot allocate memory"),
]


@pytest.mark.parametrize("message", SETUP_EXAMPLES, ids=lambda m: type(m).__name__)
def test_setup_messages_round_trip(message):
    data = encode_setup(message)
    assert decode_setup(data) == message
    assert msgspec.msgpack.decode(data)["type"] == type(message).__name__
    for n in range(len(data)):
        with pytest.raises(TransferError):
            decode_setup(data[:n])


def hello(**qp) -> bytes:
    return msgspec.msgpack.encode({"type": "RdmaHello", "qp": {**msgspec.structs.asdict(QP), **qp}})


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)),
    msgspec.msgpack.encode({"type": "KVAck", "request_id": "r"}),  # a control message, not a set-up one
    msgspec.msgpack.encode({"qp": msgspec.structs.asdict(QP)}),  # no tag
    hello(qp_num=1 << 24), hello(psn=-1), hello(lid=1 << 16), hello(mtu=0), hello(mtu=6), hello(qp_num="1"),
    hello(gid="fe80::1"), hello(gid="FE80:0000:0000:0000:0202:c9ff:fe00:0001"), hello(bogus=1),
    msgspec.msgpack.encode({"type": "RdmaHello"}),
    msgspec.msgpack.encode({"type": "RdmaWelcome", "qp": msgspec.structs.asdict(QP), "addr": -1, "rkey": 1,
                            "length": 1, "on_gpu": False}),
    msgspec.msgpack.encode({"type": "RdmaWelcome", "qp": msgspec.structs.asdict(QP), "addr": 0, "rkey": 1 << 32,
                            "length": 1, "on_gpu": False}),
    msgspec.msgpack.encode({"type": "RdmaWelcome", "qp": msgspec.structs.asdict(QP), "addr": 0, "rkey": 1,
                            "length": 0, "on_gpu": 0}),
])
def test_setup_garbage_is_rejected(data):
    with pytest.raises(TransferError, match="malformed rdma set-up message"):
        decode_setup(data)


def test_setup_framing_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        for message in SETUP_EXAMPLES:
            rdma_setup.send_setup(a, message)
            assert rdma_setup.recv_setup(b) == message
        a.sendall(struct.pack("!I", rdma_setup.MAX_SETUP_BYTES + 1))
        with pytest.raises(TransferError, match="at most"):
            rdma_setup.recv_setup(b)
        a.sendall(struct.pack("!I", 100) + b"\x81")
        a.close()
        with pytest.raises(TransferError, match="closed mid-message"):
            rdma_setup.recv_setup(b)
