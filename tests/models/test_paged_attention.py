"""The Triton paged-attention kernels against a float64 reference, the backend switch, and the engine end to end.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where fp32 and fp16 work and bf16 does not: bf16 runs in
the GPU-marked tests only. Every output buffer starts as NaN, so a row the
kernel forgets, or writes where it should not, shows.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed: no kernels to test")

from pdlab import LLM, SamplingParams  # noqa: E402
from pdlab.models.attention import AttentionContext, SeqSlice, resolve_attention_backend  # noqa: E402
from pdlab.models.kernels import triton_interpreted  # noqa: E402
from pdlab.errors import ConfigError  # noqa: E402
from pdlab.models.config import ModelConfig  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and not triton_interpreted():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is off: the kernels cannot run here", allow_module_level=True)

from pdlab.models.kernels import paged_attention as kernels  # noqa: E402  (after TRITON_INTERPRET is set)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


# --- a random paged cache and a float64 reference ---------------------------------------


class Paged:
    """A KV cache of one layer with random contents; each sequence gets blocks scattered over it."""

    def __init__(self, gen: torch.Generator, lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, spare_blocks: int = 7) -> None:
        self.block_size = block_size
        need = [-(-n // block_size) for n in lens]
        num_blocks = sum(need) + spare_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)  # [N, bs, H_kv, D]
        self.v = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        self.block_ids, start = [], 0
        for n in need:
            self.block_ids.append(perm[start: start + n])
            start += n

    def table(self, which: list[int] | None = None, extra_width: int = 0) -> torch.Tensor:
        """int32 [len(which), max_blocks + extra_width], padded with a valid but wrong block id."""
        rows = [self.block_ids[i] for i in (which if which is not None else range(len(self.block_ids)))]
        width = max(len(r) for r in rows) + extra_width
        pad = self.block_ids[0][0]
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)


def reference(q: torch.Tensor, cache: Paged, seq: int, seq_len: int) -> torch.Tensor:
    """q: [q_len, H, D] at positions [seq_len - q_len, seq_len) of sequence `seq`. float64 [q_len, H, D]."""
    q_len, num_heads, head_dim = q.shape
    blocks = torch.tensor(cache.block_ids[seq], device=q.device)
    k = cache.k[blocks].flatten(0, 1)[:seq_len].double()  # [S, H_kv, D]
    v = cache.v[blocks].flatten(0, 1)[:seq_len].double()
    group = num_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [S, H, D]
    scores = torch.einsum("qhd,shd->hqs", q.double(), k) / math.sqrt(head_dim)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, S]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqs,shd->qhd", probs, v)


def random_lens(rng: random.Random, n: int, block_size: int, high: int = 300) -> list[int]:
    """Lengths in [1, high]: mostly not multiples of block_size, plus 1 and one full block."""
    lens = [1, block_size]
    while len(lens) < n:
        x = rng.randrange(2, high)
        lens.append(x + 1 if x % block_size == 0 else x)
    rng.shuffle(lens)
    return lens


# --- decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("group, head_dim, block_size, dtype", [
    (1, 16, 4, torch.float32),
    (2, 32, 8, torch.float16),
    (4, 64, 16, torch.float32),
    (3, 64, 16, torch.float16),  # SmolLM2's 9 heads over 3 KV heads: a group that is not a power of two
    (4, 128, 16, torch.float16),
    (2, 24, 8, torch.float32),  # head_dim padded to 32 inside the kernel
])
def test_decode_matches_reference(group, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(1000 + 7 * group + head_dim + block_size)
    rng = random.Random(head_dim * group + block_size)
    num_kv_heads = 2
    lens = random_lens(rng, 5, block_size)
    cache = Paged(gen, lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, cache.k, cache.v, cache.table(extra_width=2), seq_lens, out=out)
    assert not out.isnan().any(), "the kernel left part of the output unwritten"
    want = torch.cat([reference(q[b: b + 1], cache, b, n) for b, n in enumerate(lens)])
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 5, 16])
def test_decode_split_context_matches_reference(num_splits):
    # Splits beyond a sequence's length are empty; 5 pads to 8 in the merge; 16 leaves most of them empty.
    gen = torch.Generator().manual_seed(2000 + num_splits)
    lens = [1, 77, 290, 15, 200]
    cache = Paged(gen, lens, 8, 2, 32, torch.float32)
    q = torch.randn(len(lens), 4, 32, generator=gen).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, cache.k, cache.v, cache.table(),
                                   torch.tensor(lens, dtype=torch.int32, device=DEVICE), out=out, num_splits=num_splits)
    assert not out.isnan().any()
    want = torch.cat([reference(q[b: b + 1], cache, b, n) for b, n in enumerate(lens)])
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_rows_and_empty_padding_sequences(num_splits):
    # Decodes scattered in a flat batch: only their rows are written. A padded sequence of length 0
    # (how a CUDA graph's fixed batch is filled) gets zeros and no NaN.
    gen = torch.Generator().manual_seed(3000 + num_splits)
    lens = [40, 0, 9, 133]
    cache = Paged(gen, [max(n, 1) for n in lens], 4, 1, 16, torch.float32)
    rows = [5, 0, 2, 3]
    q = torch.randn(7, 2, 16, generator=gen).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, cache.k, cache.v, cache.table(),
                                   torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                   rows=torch.tensor(rows, dtype=torch.int32, device=DEVICE), out=out,
                                   num_splits=num_splits)
    for b, (row, n) in enumerate(zip(rows, lens)):
        if n == 0:
            assert torch.equal(out[row], torch.zeros_like(out[row]))
        else:
            torch.testing.assert_close(out[row: row + 1].double(), reference(q[row: row + 1], cache, b, n),
                                       **TOL[torch.float32])
    untouched = sorted(set(range(7)) - set(rows))
    assert out[untouched].isnan().all(), "the kernel wrote rows that are not decodes"


def test_num_decode_splits_uses_only_sizes():
    f = kernels.num_decode_splits
    assert f(128, 8, 1024, 132) == 1  # B * H_kv fills the card
    assert f(1, 8, 128, 132) == 1  # too short to split
    assert f(1, 8, 1024, 132) == 8  # 1024 / 128 tokens
    assert f(1, 8, 32768, 132) == kernels.MAX_SPLITS  # capped
    assert f(4, 8, 32768, 132) == 8  # 2 * 132 / 32 programs -> 9, rounded down to a power of two
    for args in [(1, 1, 10**6, 132), (3, 2, 5000, 108), (16, 8, 4096, 132)]:
        n = f(*args)
        assert 1 <= n <= kernels.MAX_SPLITS and n & (n - 1) == 0


# --- prefill -----------------------------------------------------------------------------


@pytest.mark.parametrize("group, head_dim, block_size, dtype", [
    (1, 16, 4, torch.float32),
    (2, 32, 8, torch.float16),
    (4, 64, 16, torch.float32),
    (2, 128, 16, torch.float16),
])
def test_prefill_matches_reference(group, head_dim, block_size, dtype):
    # Whole prompts (q_len == seq_len) and chunks after cached positions, of different lengths, in one launch,
    # interleaved with rows that belong to no prefill (they must stay NaN).
    gen = torch.Generator().manual_seed(4000 + head_dim + group)
    specs = [(37, 37), (5, 70), (2, 2), (130, 201), (1, 9), (70, 70)]  # (q_len, seq_len)
    cache = Paged(gen, [s for _, s in specs], block_size, 2, head_dim, dtype)
    q_start, row = [], 1
    for q_len, _ in specs:
        q_start.append(row)
        row += q_len + 1  # one foreign row after each chunk
    q = torch.randn(row, 2 * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table(), torch.tensor(q_start, **i32),
                                    torch.tensor([n for n, _ in specs], **i32),
                                    torch.tensor([s for _, s in specs], **i32),
                                    max(n for n, _ in specs), out=out)
    written = torch.zeros(row, dtype=torch.bool)
    for n, ((q_len, seq_len), start) in enumerate(zip(specs, q_start)):
        got = out[start: start + q_len]
        assert not got.isnan().any(), f"sequence {n}: rows left unwritten"
        torch.testing.assert_close(got.double(), reference(q[start: start + q_len], cache, n, seq_len), **TOL[dtype],
                                   msg=lambda m, n=n: f"sequence {n}: {m}")
        written[start: start + q_len] = True
    assert out[~written.to(DEVICE)].isnan().all(), "the kernel wrote rows outside the chunks"


# --- the context: both backends on a mixed step ---------------------------------------------


def _mixed_step(backend: str, dtype: torch.dtype, seed: int):
    # Decodes and prefill chunks interleaved in one flat batch, as the scheduler orders them.
    gen = torch.Generator().manual_seed(seed)
    config = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=16, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512, name="attn-test")
    from pdlab.models.kv_cache import KVCache

    block_size = 8
    cache = KVCache(config, num_blocks=80, block_size=block_size, dtype=dtype, device=DEVICE)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen).to(dtype))
    perm = torch.randperm(80, generator=gen).tolist()
    specs = [(1, 50), (20, 20), (1, 3), (9, 100), (1, 129), (16, 40)]  # (q_len, seq_len)
    seqs, slots, row = [], [], 0
    for q_len, seq_len in specs:
        n = -(-seq_len // block_size)
        blocks, perm = perm[:n], perm[n:]
        seqs.append(SeqSlice(row, q_len, seq_len, blocks))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        row += q_len
    q = torch.randn(row, 4, 16, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(row, 2, 16, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(row, 2, 16, generator=gen).to(dtype).to(DEVICE)
    ctx = AttentionContext.build(cache, seqs, torch.tensor(slots, device=DEVICE), backend)
    written = []
    ctx.on_kv_written = written.append
    out = ctx.attention(1, q, k, v)
    assert written == [1]
    return out, cache.kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_step_triton_matches_torch(dtype):
    want, want_kv = _mixed_step("torch", dtype, seed=5)
    got, got_kv = _mixed_step("triton", dtype, seed=5)
    assert torch.equal(got_kv, want_kv), "both backends must store the step's K and V identically"
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_backend_choice():
    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert resolve_attention_backend("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="auto, torch, triton"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ConfigError, match="attention_backend"):
        LLM("tiny", device="cpu", num_blocks=64, max_model_len=64, attention_backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        resolve_attention_backend("triton", "cpu")


# --- end to end --------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="the CPU run of the interpreted kernels; the GPU has its own test")
def test_engine_greedy_tokens_match_torch_backend():
    # A small token budget chunks the longer prompts, so steps mix prefill chunks and decodes.
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 512) for _ in range(n)] for n in (5, 23, 41)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    args = dict(device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=16, max_model_len=128)
    want = [o.token_ids for o in LLM("tiny", attention_backend="torch", **args).generate(prompts, params)]
    llm = LLM("tiny", attention_backend="triton", **args)
    assert llm.engine.runner.attention_backend == "triton"
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


# --- GPU only ----------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, group", [(128, 4), (64, 3)])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_decode_bf16(head_dim, group, num_splits):
    gen = torch.Generator().manual_seed(6000 + head_dim)
    lens = random_lens(random.Random(head_dim), 6, 16, high=3000)
    cache = Paged(gen, lens, 16, 8 if group == 4 else 3, head_dim, torch.bfloat16, spare_blocks=100)
    q = torch.randn(len(lens), group * cache.k.shape[2], head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, cache.k, cache.v, cache.table(),
                                   torch.tensor(lens, dtype=torch.int32, device=DEVICE), out=out, num_splits=num_splits)
    want = torch.cat([reference(q[b: b + 1], cache, b, n) for b, n in enumerate(lens)])
    torch.testing.assert_close(out.double(), want, **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_prefill_bf16():
    gen = torch.Generator().manual_seed(7000)
    specs = [(1000, 1000), (300, 2100), (17, 17), (129, 500)]
    cache = Paged(gen, [s for _, s in specs], 16, 8, 128, torch.bfloat16)
    q_start = [0]
    for q_len, _ in specs[:-1]:
        q_start.append(q_start[-1] + q_len)
    T = q_start[-1] + specs[-1][0]
    q = torch.randn(T, 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    out = kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table(), torch.tensor(q_start, **i32),
                                          torch.tensor([n for n, _ in specs], **i32),
                                          torch.tensor([s for _, s in specs], **i32), max(n for n, _ in specs))
    for n, ((q_len, seq_len), start) in enumerate(zip(specs, q_start)):
        torch.testing.assert_close(out[start: start + q_len].double(),
                                   reference(q[start: start + q_len], cache, n, seq_len), **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_decode_has_no_host_sync_and_replays_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(8000)
    lens = [700, 1500, 33, 1]
    cache = Paged(gen, [2048] * len(lens), 16, 8, 128, torch.bfloat16)
    table = cache.table()  # fixed width: the graph's maximum context
    q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = kernels.num_decode_splits(len(lens), 8, table.shape[1] * 16, num_sms)
    assert splits > 1, "this shape should take the split path"
    run = lambda: kernels.paged_decode_attention(q, cache.k, cache.v, table, seq_lens, out=out)  # noqa: E731
    run()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
        with torch.cuda.graph(graph, stream=stream):
            run()
    torch.cuda.synchronize()
    for new_lens in ([5, 2048, 1000, 64], lens):
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.cat([reference(q[b: b + 1], cache, b, n) for b, n in enumerate(new_lens)])
        torch.testing.assert_close(out.double(), want, **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_engine_greedy_tokens_match_torch_backend():
    rng = random.Random(8)
    prompts = [[rng.randrange(10, 512) for _ in range(n)] for n in (5, 60, 300, 41)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    args = dict(device="cuda", dtype="float32", num_blocks=256, block_size=16, max_num_batched_tokens=64,
                max_model_len=512)
    want = [o.token_ids for o in LLM("tiny-qwen3", attention_backend="torch", **args).generate(prompts, params)]
    llm = LLM("tiny-qwen3", **args)  # auto picks triton on CUDA
    assert llm.engine.runner.attention_backend == "triton"
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
