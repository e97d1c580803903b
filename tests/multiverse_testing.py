"""Shared by the Multiverse tests: a tiny random Llama with the default model's tokenizer, and scripted control tags.

The tiny model keeps the engine runs fast; a scripted logits processor writes the tags at chosen points, so the
tests need no Multiverse-trained model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from treadle.engine.config import EngineConfig
from treadle.engine.loader import cache_dirs, default_model_path
from treadle.engine.tokenizer import Tokenizer


def save_tiny_llama(directory: str) -> torch.nn.Module:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, saved as an HF checkpoint; returns the model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=100000.0, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    meta = os.path.join(cache_dirs(EngineConfig(), default_model_path(), int4=False)[0], "meta")
    if os.path.isfile(os.path.join(meta, "tokenizer.json")):  # the loader's conversion of the GGUF's tokenizer
        tokenizer = Tokenizer.from_pretrained(meta)
    else:
        tokenizer = Tokenizer.from_gguf(default_model_path())
    tokenizer.save(directory)
    return model


@dataclass
class Rule:
    """After the latest occurrence of `anchor`, let `free` tokens be sampled, then force `forced`."""

    anchor: list[int]
    free: int
    forced: list[int]
    unless: list[int] | None = None  # the rule is off when this sequence occurs in the history


class Script:
    """A logits processor that forces tokens by rule: the rule whose anchor ends last in the history applies."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    def forced_token(self, history: list[int]) -> int | None:
        best: tuple[int, Rule] | None = None
        for rule in self.rules:
            if rule.unless is not None and _last_end(history, rule.unless) is not None:
                continue
            end = _last_end(history, rule.anchor)
            if end is not None and (best is None or end > best[0]):
                best = (end, rule)
        if best is None:
            return None
        end, rule = best
        j = len(history) - end - rule.free
        return rule.forced[j] if 0 <= j < len(rule.forced) else None

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        tok = self.forced_token(history)
        if tok is None:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[tok] = 0.0
        return out


def _last_end(history: list[int], needle: list[int]) -> int | None:
    n = len(needle)
    for end in range(len(history), n - 1, -1):
        if history[end - n : end] == needle:
            return end
    return None
