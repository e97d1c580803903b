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

from .quant_pack import CHUNK, SUPPORTED_BITS, pack_bits, unpack_bits

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantizedWeight:
    """A [out_features, in_features] linear weight as packed b-bit codes, transposed to K-major.

    packed: [K_pad * bits / 32, N] int32 (see quant_pack); scales, mins: [K_pad / group_size, N]. K_pad is
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

    @property
    def padded_in_features(self) -> int:
        return self.scales.shape[0] * self.group_size

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.packed.to(device),
            self.scales.to(device),
            self.mins.to(device),
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
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


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> QuantizedWeight:
    """Quantize a linear weight [out_features, in_features] with round-to-nearest codes per group."""
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
    return QuantizedWeight(packed, scales, mins, bits, group_size, k, n)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The weight the kernel multiplies by, in fp32 and K-major: [in_features, out_features] = q * scale + min."""
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
