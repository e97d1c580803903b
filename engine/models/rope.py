"""Rotary position embeddings (half-split layout, as in HF checkpoints) with Llama-3 / linear frequency scaling.

cos/sin are computed per step from the position ids rather than read from a table, so positions need no upper
bound (branches and independently encoded contexts may reuse or skip positions) and stay bit-identical to
transformers, which also computes them on the fly in float32.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """float32 [head_dim // 2] rotation frequencies, after the checkpoint's rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if rope_type == "freq_factors":  # GGUF's rope_freqs tensor: per-frequency divisors (Llama 3.x in llama.cpp)
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's NTK-by-parts: long wavelengths are divided by `factor`, short ones kept, the band between
    interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)


class RotaryEmbedding:
    """Computes cos/sin for a step's positions once; every layer reuses them."""

    def __init__(self, config: ModelConfig):
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] position ids -> cos, sin as [T, 1, head_dim // 2] in `dtype` (broadcast over heads)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None, None] * self.inv_freq
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by the half-split convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
