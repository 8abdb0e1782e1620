"""Host-staged KV transfer over the control socket: works between any two machines, CPU or GPU."""

from __future__ import annotations

import warnings

import torch

from pdlab.models.load import DTYPES
from pdlab.transfer.base import KVReceiver, KVSender, TransferError, gather_blocks
from pdlab.transfer.descriptor import KVLayer, encode_layer


class TcpSender(KVSender):
    def send_layer(self, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        self.check_mapping(src_block_ids, dst_block_ids)
        blocks = gather_blocks(self.local.kv, layer, src_block_ids).cpu()  # [2, n, bs, H, D]
        header = KVLayer(request_id, layer, list(dst_block_ids), self.dst.dtype, tuple(blocks.shape))
        # zmq keeps a reference to the buffer until it is sent: no extra copy.
        self.socket.send_multipart([encode_layer(header), blocks.view(torch.uint8).numpy()], copy=False)


class TcpReceiver(KVReceiver):
    def write_layer(self, header: KVLayer, payload: memoryview) -> None:
        kv = self.local.kv  # [L, 2, N, bs, H, D]
        dtype = DTYPES.get(header.dtype)
        expected = (2, len(header.dst_block_ids), *kv.shape[3:])
        if dtype != kv.dtype or tuple(header.shape) != expected or not 0 <= header.layer < kv.shape[0]:
            raise TransferError(f"KV layer frame for {header.request_id} does not fit this cache: "
                                f"layer {header.layer}, {header.dtype} {tuple(header.shape)}, expected {kv.dtype} {expected}")
        if any(not 0 <= b < kv.shape[2] for b in header.dst_block_ids):
            raise TransferError(f"KV layer frame for {header.request_id}: block id out of range")
        if len(payload) != kv.element_size() * torch.Size(expected).numel():
            raise TransferError(f"KV layer frame for {header.request_id}: {len(payload)} bytes, expected "
                                f"{kv.element_size() * torch.Size(expected).numel()}")
        with warnings.catch_warnings():  # the frame is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(expected)
        index = torch.tensor(header.dst_block_ids, dtype=torch.int64, device=kv.device)
        kv[header.layer].index_copy_(1, index, blocks.to(kv.device))
