"""4-bit GGUF weights kept 4-bit on CPU for decode, multiplied by torch's int4 weight-only CPU kernel.

GGUF Q4_0 / Q4_1 blocks are 32 consecutive input weights sharing a scale (and a minimum for Q4_1). That is exactly
torch's int4 group format with group size 32, where a weight is (q - 8) * scale + zero, so these matrices are
served from their stored 4-bit values: the only rounding is the scale and zero going to bfloat16, the same
relative error as dequantizing the weights to bfloat16, while the matmul reads a quarter of the bytes: a decode
step of the default model at batch 1-4 runs 1.6-2x faster than with dense bfloat16 weights and 2.5x faster than
in float32 (benchmarks/runner_step.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from .llama import Linear

GROUP = 32
INT4_MAX_ROWS = 12  # up to this many rows of x the 4-bit kernel beats a dense bfloat16 matmul (see Int4Linear)
Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def packable(qtypes: list[GGMLQuantizationType], out_features: int) -> bool:
    """Whether a matrix stored as `qtypes` (its fused parts) can be served by Int4Linear: torch's packing wants
    the output dimension in tiles of 16."""
    return all(t in Q4_TYPES for t in qtypes) and out_features % 16 == 0


def q4_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw GGUF rows [N, bytes] -> (q uint8 [N, K] in 0..15, scale float32 [N, K/32], zero float32 [N, K/32]),
    such that weight = (q - 8) * scale + zero."""
    n = data.shape[0]
    blocks = np.asarray(data).reshape(n, -1, 20 if qtype == GGMLQuantizationType.Q4_1 else 18)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == GGMLQuantizationType.Q4_1:  # weight = d * q + m
        zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * scale
        qs = blocks[..., 4:]
    else:  # Q4_0: weight = d * (q - 8)
        zero = np.zeros_like(scale)
        qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles are elements 0..15, high ones 16..31
    return q.reshape(n, -1), scale, zero


def q8_blocks_as_int4(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q8_0 rows [N, bytes] -> int4 blocks for [2N, K] in q4_blocks' form: rows 0..N-1 hold each 8-bit value's
    high nibble, rows N..2N-1 its low one, so that weight = high row + low row, exactly.

    A Q8_0 value is d * q with q in -128..127; q = 16 * hi + lo with hi in -8..7 and lo in 0..15, so the high row is
    (hi + 8 - 8) * 16d + 0 and the low row (lo - 8) * d + 8d."""
    n = data.shape[0]
    blocks = np.asarray(data).reshape(n, -1, 34)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.int16).reshape(n, -1)
    hi, lo = q >> 4, q & 0x0F  # arithmetic shift: floor(q / 16)
    q4 = np.concatenate([hi + 8, lo]).astype(np.uint8)
    scales = np.concatenate([16 * scale, scale])
    zeros = np.concatenate([np.zeros_like(scale), 8 * scale])
    return q4, scales, zeros


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> dict[str, torch.Tensor]:
    """The Int4Linear buffers for [N, K] q values and their [N, K/32] scales and zeros."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
    scales_zeros = torch.from_numpy(np.stack([scale, zero], axis=-1).transpose(1, 0, 2).copy())
    return {"qweight": packed, "scales_zeros": scales_zeros.to(torch.bfloat16)}


class Int4Linear(Linear):
    """A bfloat16 Linear that also holds its weight in torch's packed int4 CPU layout (group size 32).

    The int4 kernel is a matrix-vector kernel: its cost grows linearly with the rows of x, and on the default model
    dense bfloat16 matmuls overtake it between 8 and 16 rows. So decode steps of small batches use the 4-bit copy
    and prefill chunks or large batches the dense one; the two copies hold the same GGUF values."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // GROUP, out_features, 2, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > INT4_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, GROUP, self.scales_zeros)
        return y if self.bias is None else y + self.bias


class Int4Head(nn.Module):
    """The tied LM head of a GGUF whose embedding is Q8_0, for decode steps of one or two rows: its exact 8-bit
    values as two 4-bit halves (q8_blocks_as_int4), i.e. half the bytes of the dense bfloat16 copy, read by the
    int4 kernel. On the default model it is the largest matrix, and this halves its share of a batch-1 step."""

    max_rows = 2  # the kernel runs over both halves, so it beats the dense copy only for the smallest batches

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("qweight", torch.empty(2 * vocab_size, hidden_size // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(hidden_size // GROUP, 2 * vocab_size, 2, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, GROUP, self.scales_zeros).float()
        return y[:, : self.vocab_size] + y[:, self.vocab_size :]


def adopt_int4_linears(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap each Linear whose weights arrive with a `<name>.qweight` for an Int4Linear of the same shape, and give
    the model an Int4Head when `head_int4.qweight` arrives."""
    for key in state:
        if key == "head_int4.qweight":
            with torch.device("meta"):
                model.head_int4 = Int4Head(model.config.vocab_size, model.config.hidden_size)
        elif key.endswith(".qweight"):
            parent_name, _, child = key[: -len(".qweight")].rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, child)
            with torch.device("meta"):
                setattr(parent, child, Int4Linear(dense.in_features, dense.out_features, dense.bias is not None))
