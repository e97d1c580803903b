"""Layered configuration for `treadle serve`: EngineConfig defaults < configs/<device>.yaml < --config FILE < flags.

The per-device YAML carries the tuned defaults so that one CLI serves both a 2-core CPU box and an H100 well;
keys are checked against EngineConfig so a typo in a file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from treadle.engine.config import EngineConfig
from treadle.engine.multiverse_tags import MultiverseTags
from treadle.engine.sampling_params import InvalidParameterError, ParallelParams

SERVER_KEYS = ("host", "port", "api_key", "tool_call_parser", "grammar_compile_timeout", "parallel", "multiverse_tags")
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig))
API_KEY_ENV = "TREADLE_API_KEY"


class ConfigError(ValueError):
    """A configuration file or flag combination is invalid; the message names the key."""


@dataclass
class ServeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = None  # None: from the chat template
    grammar_compile_timeout: float = 5.0  # seconds; a structured-output request over it gets a 400
    parallel: ParallelParams | None = None  # Multiverse defaults for requests without `parallel` (None: off)
    multiverse_tags: MultiverseTags | None = None  # the model's control tags, if not the Multiverse defaults


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def packaged_defaults(device: str) -> dict[str, Any]:
    """The shipped defaults for a device kind: configs/cuda.yaml for cuda and cuda:N, configs/cpu.yaml otherwise."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    text = resources.files("treadle.configs").joinpath(f"{kind}.yaml").read_text()
    return _check_mapping(yaml.safe_load(text) or {}, f"{kind}.yaml")


def read_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return _check_mapping(data or {}, path)


def _check_mapping(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values")
    unknown = sorted(set(data) - set(ENGINE_KEYS) - set(SERVER_KEYS))
    if unknown:
        valid = ", ".join(sorted(ENGINE_KEYS + SERVER_KEYS))
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    return data


def build_serve_config(flags: dict[str, Any], config_file: str | None = None) -> ServeConfig:
    """Merge the layers; `flags` holds only the options given on the command line (None means not given)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    _check_mapping(flags, "command line")
    user = read_config_file(config_file) if config_file else {}
    device = flags.get("device") or user.get("device") or default_device()
    merged = {**packaged_defaults(device), **user, **flags, "device": device}

    # A KV pool size given at a higher layer replaces a lower layer's choice of how to size the pool.
    for layer in (user, flags):
        if "kv_cache_gb" in layer or "kv_memory_fraction" in layer:
            merged["num_pages"] = layer.get("num_pages")
    # The engine sizes the pool by kv_cache_gb on CPU and by kv_memory_fraction on CUDA; reject the flag it ignores.
    on_cuda = device.startswith("cuda")
    if not on_cuda and "kv_memory_fraction" in flags:
        raise ConfigError("--kv-memory-fraction sizes the KV pool from free GPU memory; on CPU use --kv-cache-gb")
    if on_cuda and "kv_cache_gb" in flags:
        raise ConfigError("--kv-cache-gb sizes the KV pool on CPU; on CUDA use --kv-memory-fraction or --num-pages")

    api_key = merged.pop("api_key", None)
    if "api_key" not in flags:
        api_key = os.environ.get(API_KEY_ENV) or api_key
    server = {k: merged.pop(k) for k in SERVER_KEYS if k in merged and k != "api_key"}
    try:
        engine = TypeAdapter(EngineConfig).validate_python(merged)
        checked = TypeAdapter(ServeConfig).validate_python({"engine": engine, **server, "api_key": api_key or None})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if p != "engine")
        raise ConfigError(f"option {key}: {err['msg']} (got {err.get('input')!r})") from None
    if not 0 <= checked.port <= 65535:
        raise ConfigError(f"option port: must be in [0, 65535] (got {checked.port})")
    if checked.engine.grammar_workers < 0:
        raise ConfigError(f"option grammar_workers: must be 0 or more (got {checked.engine.grammar_workers})")
    if not checked.grammar_compile_timeout > 0:
        raise ConfigError(f"option grammar_compile_timeout: must be positive (got {checked.grammar_compile_timeout})")
    if checked.parallel is not None:
        try:
            checked.parallel.validate()
        except InvalidParameterError as exc:
            raise ConfigError(f"option {exc.param}: {exc}") from None
    return checked
