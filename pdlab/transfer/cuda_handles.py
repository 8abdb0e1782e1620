"""CUDA IPC through the driver API: export an allocation's handle, map another process's.

The KV transport (`pdlab.transfer.cuda_ipc`) and the weights one instance maps from
another on the same GPU (`pdlab.engine.shared_weights`) both use these. The importer
opens a handle while its own GPU is current, with lazy peer access: opening it through
PyTorch's IPC rebuild maps it on the exporter's GPU, and a kernel on another GPU then
faults. Loaded with ctypes from the driver (`libcuda.so.1`), so nothing beyond PyTorch
is needed.
"""

from __future__ import annotations

import ctypes

import torch

IPC_HANDLE_BYTES = 64
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaIpcError(RuntimeError):
    """A driver call for CUDA IPC failed; the message names the call and the driver's error."""


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


_libcuda = None


def _cuda():
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
    return _libcuda


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _cuda().cuGetErrorName(result, ctypes.byref(name))
        raise CudaIpcError(f"{what} failed: {name.value.decode() if name.value else result}")


def allocation_of(ptr: int) -> tuple[int, int]:
    """(base address, size in bytes) of the driver allocation holding device address `ptr`."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(_cuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)),
           "cuMemGetAddressRange")
    return base.value, size.value


def export_allocation(base: int) -> bytes:
    """The IPC handle (64 bytes) of the allocation starting at `base`."""
    handle = _IpcHandle()
    _check(_cuda().cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(base)), "cuIpcGetMemHandle")
    return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)


def export_handle(tensor: torch.Tensor) -> tuple[bytes, int]:
    """(IPC handle of the allocation holding `tensor`, `tensor`'s byte offset in it)."""
    torch.cuda.set_device(tensor.device)
    base, _ = allocation_of(tensor.data_ptr())
    return export_allocation(base), tensor.data_ptr() - base


def open_handle(handle: bytes, device: torch.device) -> int:
    """Map another process's allocation into this one, for kernels on `device`; returns its address."""
    if len(handle) != IPC_HANDLE_BYTES:
        raise CudaIpcError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device).synchronize()  # makes the primary context current on this thread
    h = _IpcHandle()
    ctypes.memmove(ctypes.addressof(h), handle, IPC_HANDLE_BYTES)  # c_char arrays stop at NUL; copy raw
    ptr = ctypes.c_uint64()
    _check(_cuda().cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)),
           "cuIpcOpenMemHandle")
    return ptr.value


def close_handle(address: int) -> None:
    """Unmap what `open_handle` mapped."""
    _cuda().cuIpcCloseMemHandle(ctypes.c_uint64(address))


def enable_peer_access(device: torch.device, peer: int) -> None:
    """Let kernels on `device` reach `peer`'s memory (needed inside one process only)."""
    if device.index == peer:
        return
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device).synchronize()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(_cuda().cuDeviceGet(ctypes.byref(dev), peer), "cuDeviceGet")
    _check(_cuda().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    result = _cuda().cuCtxEnablePeerAccess(ctx, ctypes.c_uint(0))
    if result not in (0, 704):  # 704: already enabled
        _check(result, "cuCtxEnablePeerAccess")


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same card seen from two processes, whatever CUDA_VISIBLE_DEVICES numbers it."""
    return str(torch.cuda.get_device_properties(device).uuid)
