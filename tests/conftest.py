"""Fixtures and settings shared by every test package."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. `triton.jit`
# reads this when it decorates a kernel, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
