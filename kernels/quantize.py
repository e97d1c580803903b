"""Round-to-nearest group-wise weight quantization to b bits, and its error.

Each group of `group_size` consecutive input features of one output column stores b-bit codes q with a scale
and a minimum: w ~ q * scale + min. The minimum is the zero point kept as a float (as GGUF's Q4_1 does): the
dequantization is one fused multiply-add, and the matmul kernel folds it into the dot product once per group
(sum x*w = scale * sum x*q + min * sum x) instead of once per weight.

Scales and minimums are stored in the weight's dtype. They are rounded outward (minimum down, scale up) before
the codes are chosen from the stored values, so every weight stays inside its group's representable range and
the error of each weight is at most scale / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant_pack import (
    CHUNK,
    SUPPORTED_BITS,
    from_row_blocks,
    pack_bits,
    to_row_blocks,
    unpack_bits,
)

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantizedWeight:
    """A [out_features, in_features] linear weight as packed b-bit codes, transposed to K-major.

    block_n = 0: packed [K_pad * bits / 32, N] int32 (see quant_pack); scales, mins: [K_pad / group_size, N].
    block_n > 0: the same arrays in quant_pack's row-blocked decode layout (`to_row_blocks` with block_n
    columns per block; the words in runs of group_size / 32 chunks), [ceil(N / block_n), ...]. K_pad is
    in_features rounded up to a multiple of group_size; the padding codes repeat the last real input feature and
    meet zeros in the activations, so they never contribute.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    block_n: int = 0

    @property
    def groups(self) -> int:
        return self.scales.shape[1] // self.block_n if self.block_n else self.scales.shape[0]

    @property
    def padded_in_features(self) -> int:
        return self.groups * self.group_size

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.packed.to(device),
            self.scales.to(device),
            self.mins.to(device),
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
            self.block_n,
        )


@dataclass
class QuantError:
    """How far the dequantized weight is from the original, over all elements."""

    max_abs: float
    rms: float
    relative: float  # ||W - W_hat||_F / ||W||_F


def check_group_size(group_size: int) -> None:
    """Groups are whole chunks of 32 codes and a power of two, so one group is one tile of the matmul kernel."""
    if group_size < CHUNK or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= {CHUNK}, got {group_size}")


def _outward(values: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """Round fp32 values to `dtype`, moving one ulp in `direction` wherever plain rounding went the other way."""
    rounded = values.to(dtype)
    wrong = (rounded.float() - values) * direction < 0
    step = torch.nextafter(rounded, torch.full_like(rounded, direction * float("inf")))
    return torch.where(wrong, step, rounded)


def row_blocked(qw: QuantizedWeight, block_n: int) -> QuantizedWeight:
    """`qw` in the layout of `block_n` (0: the flat one, else row blocks of block_n columns): same values."""
    if block_n < 0 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be 0 or a power of two, got {block_n}")
    if block_n == qw.block_n:
        return qw
    if qw.block_n:
        qw = flat(qw)
    run = qw.group_size // CHUNK
    return QuantizedWeight(
        to_row_blocks(qw.packed, block_n, run, qw.bits),
        to_row_blocks(qw.scales, block_n),
        to_row_blocks(qw.mins, block_n),
        qw.bits,
        qw.group_size,
        qw.in_features,
        qw.out_features,
        block_n,
    )


def flat(qw: QuantizedWeight) -> QuantizedWeight:
    """`qw` in the flat [K-rows, N] layout."""
    if not qw.block_n:
        return qw
    n, b, run = qw.out_features, qw.block_n, qw.group_size // CHUNK
    return QuantizedWeight(
        from_row_blocks(qw.packed, n, b, run, qw.bits).contiguous(),
        from_row_blocks(qw.scales, n, b).contiguous(),
        from_row_blocks(qw.mins, n, b).contiguous(),
        qw.bits,
        qw.group_size,
        qw.in_features,
        n,
    )


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128, block_n: int = 0) -> QuantizedWeight:
    """Quantize a linear weight [out_features, in_features] with round-to-nearest codes per group, stored in
    the layout of `block_n` (see QuantizedWeight)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    check_group_size(group_size)
    if weight.dim() != 2 or weight.dtype not in SCALE_DTYPES:
        raise ValueError(f"weight must be a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or infinite entries")
    n, k = weight.shape
    k_pad = -(-k // group_size) * group_size
    w = weight.detach().float().t()
    if k_pad != k:
        w = torch.cat([w, w[-1:].expand(k_pad - k, n)])
    groups = w.reshape(k_pad // group_size, group_size, n)
    levels = (1 << bits) - 1
    mins = _outward(groups.amin(1), weight.dtype, -1.0)
    span = (groups.amax(1) - mins.float()) / levels
    scales = _outward(torch.where(span > 0, span, torch.ones_like(span)), weight.dtype, 1.0)
    q = torch.round((groups - mins.float()[:, None]) / scales.float()[:, None]).clamp_(0, levels)
    packed = pack_bits(q.to(torch.int32).view(k_pad, n), bits)
    return row_blocked(QuantizedWeight(packed, scales, mins, bits, group_size, k, n), block_n)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The weight the kernel multiplies by, in fp32 and K-major: [in_features, out_features] = q * scale + min."""
    qw = flat(qw)
    q = unpack_bits(qw.packed, qw.bits).float()
    groups = q.view(-1, qw.group_size, qw.out_features)
    w = groups * qw.scales.float()[:, None] + qw.mins.float()[:, None]
    return w.view(-1, qw.out_features)[: qw.in_features]


def quantization_error(weight: torch.Tensor, qw: QuantizedWeight) -> QuantError:
    """Error of `qw` against the [out_features, in_features] weight it was made from."""
    w = weight.detach().float().t()
    diff = dequantize(qw) - w
    return QuantError(
        max_abs=float(diff.abs().max()),
        rms=float(diff.pow(2).mean().sqrt()),
        relative=float(diff.norm() / w.norm().clamp_min(1e-30)),
    )
