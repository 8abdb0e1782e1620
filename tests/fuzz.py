"""Byte-level corruption of valid encodings, for decoders that must return a well-typed value or refuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypothesis import strategies as st


def corrupted(data: bytes, draw: Callable, byte_values: Sequence[int] = range(256), max_edits: int = 3,
              edits: Sequence[str] = ("replace", "insert", "delete")) -> bytes:
    """`data` with 1 to `max_edits` bytes replaced, inserted or deleted (or, with "truncate", the tail cut),
    drawn with hypothesis' `draw`: often still well formed, sometimes still a valid value."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        i = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(byte_values))
        edit = draw(st.sampled_from(edits))
        if edit == "replace" and i < len(data):
            data[i] = byte
        elif edit == "insert":
            data.insert(i, byte)
        elif edit == "delete" and i < len(data):
            del data[i]
        elif edit == "truncate":
            del data[i:]
    return bytes(data)
