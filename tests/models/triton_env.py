"""Where the Triton kernel tests run: on a GPU in bf16 and fp16, or without one in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports a kernel) in fp16 and fp32, bf16 being
wrong there. Importing this skips the importing test module when neither is possible."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernels are written in Triton")

from pdlab.models.kernels import triton_interpreted  # noqa: E402

ON_GPU = torch.cuda.is_available() and not triton_interpreted()
if not ON_GPU and not triton_interpreted():
    pytest.skip("no CUDA GPU, and TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16, torch.float32]
