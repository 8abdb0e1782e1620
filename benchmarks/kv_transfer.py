"""KV hand-off inside one machine: the `ipc` transport against one raw peer copy of the same bytes.

    python benchmarks/kv_transfer.py --out data/bench/kv_transfer.json

Part 1, bandwidth: a "decode" process on GPU 1 (GPU 0 on a machine with one
GPU: two instances sharing it) exports its llama3-8b-shaped KV cache; a
"prefill" process on GPU 0 pushes 1k, 4k and 16k tokens' worth of randomly
placed blocks into it, layer by layer, through `CudaIpcSender` (what a prefill
instance does), and checks the bytes that landed. In the same process and run:
one raw copy (`copy_` GPU 0 -> GPU 1, or GPU 0 -> GPU 0) of the same number of
contiguous bytes. Part 2, TTFT: 4k-token prompts served by one colocated
(`mixed`) instance on GPU 0, then by a prefill instance on GPU 0 and a decode
instance on the other GPU (or the same one) over ipc, measured at the client.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdlab.cluster.messages import KVDescriptor  # noqa: E402
from pdlab.models.kv_cache import KVCache  # noqa: E402
from pdlab.models.presets import PRESETS  # noqa: E402

BLOCK_SIZE = 16
SIZES_TOKENS = (1024, 4096, 16384)


def _descriptor(cache: KVCache) -> KVDescriptor:
    from pdlab.transfer.cuda_ipc import CudaIpcReceiver

    kv = cache.kv
    return KVDescriptor(instance_id="bench-decode", protocol="ipc", cache_endpoint="", num_layers=kv.shape[0],
                        num_blocks=kv.shape[2], block_size=kv.shape[3], num_kv_heads=kv.shape[4], head_dim=kv.shape[5],
                        dtype=str(kv.dtype).removeprefix("torch."), **CudaIpcReceiver(cache).descriptor_fields())


def decode_side(conn, num_blocks: int, gpu: int) -> None:
    torch.cuda.set_device(gpu)
    cache = KVCache(PRESETS["llama3-8b"], num_blocks, BLOCK_SIZE, torch.bfloat16, f"cuda:{gpu}")
    conn.send_bytes(encode_descriptor(_descriptor(cache)))
    while True:
        request = conn.recv_bytes().decode()
        if request == "stop":
            return
        # "sum:<comma-separated block ids>": checksum of those blocks, every layer.
        ids = torch.tensor([int(x) for x in request.split(":")[1].split(",")], device=f"cuda:{gpu}")
        conn.send_bytes(str(float(cache.kv.index_select(2, ids).float().sum())).encode())


def encode_descriptor(d: KVDescriptor) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(d)


def prefill_side(conn, num_blocks: int, repeats: int, dst_gpu: int) -> list[dict]:
    import msgspec

    from pdlab.transfer.cuda_ipc import CudaIpcSender, copy_blocks

    torch.cuda.set_device(0)
    dst = msgspec.msgpack.decode(conn.recv_bytes(), type=KVDescriptor)
    cache = KVCache(PRESETS["llama3-8b"], num_blocks, BLOCK_SIZE, torch.bfloat16, "cuda:0")
    cache.kv.normal_()
    sender = CudaIpcSender(cache, dst, socket=None)
    num_layers = cache.kv.shape[0]
    bytes_per_block = cache.kv[0, :, 0].numel() * cache.kv.element_size() * num_layers
    gen = torch.Generator().manual_seed(0)
    rows = []
    for tokens in SIZES_TOKENS:
        n = tokens // BLOCK_SIZE
        src = torch.randperm(num_blocks, generator=gen)[:n].tolist()
        dst_ids = torch.randperm(num_blocks, generator=gen)[:n].tolist()
        nbytes = n * bytes_per_block

        def per_layer():  # what a prefill instance does: one launch per layer, as each layer is written
            for layer in range(num_layers):
                sender.send_layer("bench", layer, src, dst_ids)
            sender.flush()

        def one_launch():  # the whole request at once, after the forward pass
            sender.send_layers("bench", range(num_layers), src, dst_ids)
            sender.flush()

        def timed(fn) -> float:
            fn()  # warm-up (Triton compile)
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize(0)
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        ids = torch.tensor([src, dst_ids], dtype=torch.int32, device="cuda:0")

        def kernel_only():  # the same kernel through the same IPC mapping, ids already on the GPU
            copy_blocks(cache.kv, sender.dst_addr, ids[0], ids[1], range(num_layers), dst.num_blocks)
            torch.cuda.synchronize(0)

        per_layer_s, one_launch_s, kernel_s = timed(per_layer), timed(one_launch), timed(kernel_only)
        # Correctness: what landed equals what was sent.
        conn.send_bytes(("sum:" + ",".join(map(str, dst_ids))).encode())
        remote_sum = float(conn.recv_bytes())
        local_sum = float(cache.kv.index_select(2, torch.tensor(src, device="cuda:0")).float().sum())
        # Baseline: one raw peer copy of the same number of bytes, contiguous.
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_gpu}")
        b.copy_(a)
        raw = []
        for _ in range(repeats):
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(dst_gpu)
            t = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize(dst_gpu)
            torch.cuda.synchronize(0)
            raw.append(time.perf_counter() - t)
        del a, b
        raw_s = statistics.median(raw)
        rows.append({
            "tokens": tokens, "blocks": n, "bytes": nbytes, "layers": num_layers,
            "per_layer_ms": per_layer_s * 1e3, "per_layer_GBps": nbytes / per_layer_s / 1e9,
            "one_launch_ms": one_launch_s * 1e3, "one_launch_GBps": nbytes / one_launch_s / 1e9,
            "kernel_only_ms": kernel_s * 1e3, "kernel_only_GBps": nbytes / kernel_s / 1e9,
            "kernel_only_ratio_to_raw": raw_s / kernel_s,
            "raw_peer_copy_ms": raw_s * 1e3, "raw_peer_copy_GBps": nbytes / raw_s / 1e9,
            "per_layer_ratio_to_raw": raw_s / per_layer_s, "one_launch_ratio_to_raw": raw_s / one_launch_s,
            "bytes_match": abs(remote_sum - local_sum) <= 1e-3 * abs(local_sum) + 1e-3,
        })
        print(json.dumps(rows[-1]), flush=True)
    conn.send_bytes(b"stop")
    sender.close()
    return rows


def bandwidth(repeats: int, dst_gpu: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    num_blocks = 2 * SIZES_TOKENS[-1] // BLOCK_SIZE
    proc = ctx.Process(target=decode_side, args=(child, num_blocks, dst_gpu), daemon=True)
    proc.start()
    try:
        return prefill_side(parent, num_blocks, repeats, dst_gpu)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def ttft(model: str, prompt_tokens: int, num_requests: int, log_dir: Path, dst_gpu: int) -> dict:
    """Median client-side TTFT of sequential requests, colocated vs disaggregated."""
    from pdlab.cluster.client import RemoteEngine
    from pdlab.cluster.launch import start_instance
    from pdlab.sampling_params import SamplingParams

    share = "0.6" if dst_gpu else "0.4"  # two instances on one GPU split it
    common = ["--max-model-len", str(prompt_tokens + 64), "--max-num-batched-tokens", str(prompt_tokens + 64),
              "--gpu-memory-utilization", share, "--cache-transfer-protocol", "ipc"]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 120000, (prompt_tokens,), generator=gen).tolist() for _ in range(num_requests + 2)]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def measure(endpoint: str) -> list[float]:
        engine = RemoteEngine(endpoint, poll_s=0.0005)
        out = []
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, f"t{i}")
            first = None
            while engine.has_unfinished():
                for o in engine.step():
                    if o.first_token_time_s is not None and first is None:
                        first = o.ttft_s
            if i >= 2:  # the first two warm up
                out.append(first)
        engine.close()
        return out

    result = {"model": model, "prompt_tokens": prompt_tokens, "num_requests": num_requests, "decode_gpu": dst_gpu}
    mixed = start_instance("mixed", model, log_dir, extra_args=common, env={"CUDA_VISIBLE_DEVICES": "0"})
    try:
        mixed.wait_ready(600)
        result["colocated_ttft_ms"] = [t * 1e3 for t in measure(mixed.endpoint)]
    finally:
        mixed.stop()
    prefill = start_instance("prefill", model, log_dir, extra_args=common, env={"CUDA_VISIBLE_DEVICES": "0"})
    decode_ = start_instance("decode", model, log_dir, env={"CUDA_VISIBLE_DEVICES": str(dst_gpu)},
                             extra_args=common + ["--innode-prefill-ports", str(prefill.engine_worker_queue_port)])
    try:
        prefill.wait_ready(600)
        decode_.wait_ready(600)
        result["disaggregated_ttft_ms"] = [t * 1e3 for t in measure(decode_.endpoint)]
    finally:
        prefill.stop()
        decode_.stop()
    c, d = statistics.median(result["colocated_ttft_ms"]), statistics.median(result["disaggregated_ttft_ms"])
    result.update(colocated_ttft_p50_ms=c, disaggregated_ttft_p50_ms=d, ratio=d / c)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/bench/kv_transfer.json"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ttft-model", default="llama3-8b")
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--one-gpu", action="store_true", help="both sides on GPU 0 even with two GPUs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kv_transfer.py needs a GPU")
    from pdlab.provenance import provenance

    dst_gpu = 0 if args.one_gpu or torch.cuda.device_count() < 2 else 1
    report = {"provenance": provenance(), "decode_gpu": dst_gpu, "bandwidth": bandwidth(args.repeats, dst_gpu)}
    if not args.skip_ttft:
        report["ttft_4k"] = ttft(args.ttft_model, 4096, args.ttft_requests, args.out.parent / "logs", dst_gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
