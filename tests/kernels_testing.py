"""Shared setup for tests/test_kernels_*.py: Triton's interpreter on machines without a GPU.

Import this before any `treadle.kernels` module: TRITON_INTERPRET is read when a kernel is decorated. The
interpreter in Triton 3.6 turns a scalar loaded from memory into a one-element array and converts it with
`int()`, which NumPy >= 2.4 refuses; loops bounded by loaded lengths then fail, so `__index__` is widened to
accept one-element arrays for the duration of each interpreted launch.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

if not ON_GPU:
    import triton.runtime.interpreter as _interp

    _patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor_numpy2(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor_numpy2

DEVICE = "cuda" if ON_GPU else "cpu"


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """A tensor full of NaN (or -1 for integers), so any element a kernel forgets to write shows up."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf so it never passes a tolerance."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def nan_allocations():
    """Within the block, torch.empty/empty_like return NaN-filled (or -1) tensors, so an output element that a
    kernel forgets to write cannot pass for a right one. Wrap only the kernel call: other code may rely on
    torch.empty for buffers it overwrites in ways these tests do not control."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-1)

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
