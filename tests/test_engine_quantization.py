"""`--quantization wNa16 --bits N`: the loader swaps every linear layer but the LM head for a QuantLinear."""

import pytest
import torch

from treadle.engine.config import EngineConfig
from treadle.engine.loader import load_model
from treadle.server.serve_config import build_serve_config

pytest.importorskip("triton")
from treadle.kernels.quant_linear import QuantLinear  # noqa: E402


def test_quantized_load_keeps_the_model_close():
    ref = load_model(EngineConfig(dtype="float32"), progress=False)
    q8 = load_model(EngineConfig(dtype="float32", quantization="wNa16", quant_bits=8), progress=False)
    quantized = [m for m in q8.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 4 * q8.config.num_layers  # qkv, o, gate_up, down in every layer; the LM head stays
    assert all(m.bits == 8 and m.group_size == 128 for m in quantized)
    w = ref.model.layers[0].qkv_proj.weight
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    exact = x @ w.T
    rel = (q8.model.layers[0].qkv_proj(x) - exact).norm() / exact.norm()
    assert rel < 0.02  # 8-bit groups of 128


def test_unsupported_quantization_is_refused():
    with pytest.raises(ValueError, match="wNa16"):
        load_model(EngineConfig(quantization="awq"), progress=False)


def test_serve_flags_reach_the_engine_config():
    cfg = build_serve_config({"device": "cpu", "quantization": "wNa16", "quant_bits": 3})
    assert cfg.engine.quantization == "wNa16" and cfg.engine.quant_bits == 3
