"""GPU kernels of the model's forward, written in Triton.

- `paged_attention.py` (launches; the kernels in `paged_attention_kernels.py`): decode (flash-decoding over block tables) and varlen
  prefill (chunks after cached positions) attention on the paged KV cache;
  the GPU path of `pdlab.models.attention.AttentionContext`;
- `wint_matmul.py`: weight-only int8/int4 matmuls (pdlab/models/quant.py), and `wint_linear.py`, which
  picks one by rows and card from a measured table (`configs/`).

Importing this package imports no Triton: the kernel modules do, and only
the triton attention backend imports them. `triton.jit` reads
`TRITON_INTERPRET` when it decorates a kernel, so set it before the first
import of a kernel module to run the kernels on a CPU in Triton's
interpreter (fp32 and fp16 only: bf16 is wrong there).
"""

from __future__ import annotations

import os


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors) rather than on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
