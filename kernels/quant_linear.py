"""`QuantLinear`, a drop-in nn.Linear over a b-bit weight, and `quantize_model_`, which swaps it in at load time.

On CUDA the forward pass is the fused Triton kernel. Elsewhere there is no fused kernel, so the module
dequantizes once (fp32, the values the kernel multiplies by) and caches that: the numerics are those of the
kernel, the speed and memory those of the unquantized fp32 model.

The weight is stored in row blocks of 16 columns (QuantizedWeight.block_n) at every bit width: in H100 runs of
benchmarks/quant_gemv.py (docs/benchmarks.md) the CUDA tensor-core kernel, which serves M <= 16, and the Triton
GEMV were as fast or faster on them than on the flat layout at every width (4 bits: 3% at M = 1, 9% at M = 16),
and so was the Triton tensor-core kernel at M = 64 except at 4 bits (2-7% slower: prefill pays a little for
decode). Both layouts hold the same bytes, so the choice costs no memory.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_matmul import quant_matmul
from .quantize import QuantizedWeight, dequantize, quantize_rtn

DEFAULT_BLOCK_N = 16  # the weight layout, see the module docstring


class QuantLinear(nn.Module):
    """y = x @ W_hat.T + bias with W_hat = q * scale + min stored as packed b-bit codes (see quantize.py)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size, self.block_n = qw.bits, qw.group_size, qw.block_n
        self.register_buffer("packed", qw.packed)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("mins", qw.mins)
        self.register_buffer("bias", bias)
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int = 128, block_n: int | None = None
    ) -> QuantLinear:
        """`block_n`: the weight layout (QuantizedWeight.block_n); None picks DEFAULT_BLOCK_N."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layout = DEFAULT_BLOCK_N if block_n is None else block_n
        return cls(quantize_rtn(linear.weight, bits, group_size, layout), bias)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.packed, self.scales, self.mins, self.bits, self.group_size, self.in_features, self.out_features,
            self.block_n,
        )

    def _apply(self, fn, recurse=True):
        self._dense = None  # moved or cast: the cached dequantized weight is stale
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        rows = x.reshape(-1, self.in_features)
        if x.is_cuda:
            out = quant_matmul(rows if rows.stride(-1) == 1 else rows.contiguous(), self.quantized_weight, self.bias)
        else:
            if self._dense is None:
                self._dense = dequantize(self.quantized_weight)
            y = rows.float() @ self._dense
            if self.bias is not None:
                y = y + self.bias.float()
            out = y.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, block_n={self.block_n}, bias={self.bias is not None}"
        )


def quantize_model_(
    model: nn.Module,
    bits: int,
    group_size: int = 128,
    skip: tuple[str, ...] = ("lm_head",),
    block_n: int | None = None,
) -> list[str]:
    """Replace every nn.Linear of `model` in place by a QuantLinear; returns the names replaced.

    Modules whose own name is in `skip` stay as they are: the LM head by default, whose weight the model reads
    directly for the logits, and which is the layer most sensitive to quantization.
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, QuantLinear.from_linear(child, bits, group_size, block_n))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced
