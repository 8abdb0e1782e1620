"""Tile size and warps of the KV block-copy kernel, GPU 0 -> GPU 1 (one process, peer access), against copy_.

    python benchmarks/tune_kv_copy.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdlab.models.kv_cache import KVCache  # noqa: E402
from pdlab.models.presets import PRESETS  # noqa: E402
from pdlab.transfer.cuda_ipc import copy_blocks, enable_peer_access  # noqa: E402


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize(0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(0)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    num_blocks = 2048
    src = KVCache(PRESETS["llama3-8b"], num_blocks, 16, torch.bfloat16, "cuda:0")
    dst = KVCache(PRESETS["llama3-8b"], num_blocks, 16, torch.bfloat16, "cuda:1")
    src.kv.normal_()
    enable_peer_access(torch.device("cuda:0"), 1)
    torch.cuda.set_device(0)
    addr = torch.tensor([dst.kv.data_ptr()], dtype=torch.int64, device="cuda:0")
    gen = torch.Generator().manual_seed(0)
    for tokens in (4096, 16384):
        n = tokens // 16
        ids = torch.stack([torch.randperm(num_blocks, generator=gen)[:n] for _ in range(2)]).int().to("cuda:0")
        nbytes = n * src.kv[:, :, 0].numel() * 2
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
        raw = timed(lambda: (b.copy_(a), torch.cuda.synchronize(1)))
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                t = timed(lambda: copy_blocks(src.kv, addr, ids[0], ids[1], range(32), num_blocks, block, warps))
                print(json.dumps({"tokens": tokens, "block": block, "warps": warps, "GBps": round(nbytes / t / 1e9, 1),
                                  "ratio_to_raw": round(raw / t, 3)}), flush=True)
        ok = torch.equal(dst.kv[:, :, ids[1].long().cpu()].cpu(), src.kv[:, :, ids[0].long().cpu()].cpu())
        print(json.dumps({"tokens": tokens, "raw_GBps": round(nbytes / raw / 1e9, 1), "bitwise_equal": ok}), flush=True)


if __name__ == "__main__":
    main()
