"""The engine's tokenizer: one HF fast tokenizer plus the few facts the engine needs (EOS ids, chat template).

Wrapping rather than re-implementing keeps byte-level BPE, added tokens and Jinja chat templates exactly as the
model's publisher defined them; `.hf` is exposed because the grammar engine builds its token tables from it.
"""

from __future__ import annotations

import os

import jinja2
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (no template, or the template rejected them); a client error."""


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: list[int] | None = None):
        if not hf.is_fast:
            raise ValueError(f"{type(hf).__name__} is not a fast (Rust) tokenizer; treadle needs tokenizer.json")
        self.hf = hf
        ids = list(eos_token_ids or [])
        if not ids and hf.eos_token_id is not None:
            ids = [hf.eos_token_id]
        self.eos_token_ids: list[int] = ids
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)
        self.all_special_ids: list[int] = list(hf.all_special_ids)
        template = hf.chat_template
        if isinstance(template, dict):  # several named templates: the unnamed one is "default"
            template = template.get("default")
        self.chat_template: str | None = template

    @classmethod
    def from_pretrained(cls, path: str, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        """Load from an HF-style directory (tokenizer.json, tokenizer_config.json, chat template).

        tokenizer.json, when present, is taken as the whole truth: AutoTokenizer would pick a model-specific class
        from config.json that may rebuild the pipeline from the vocab and disagree with the file.
        """
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return cls(PreTrainedTokenizerFast.from_pretrained(path), eos_token_ids)
        return cls(_auto_tokenizer().from_pretrained(path), eos_token_ids)

    @classmethod
    def from_gguf(cls, path: str, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        """Build from GGUF metadata (vocab, merges, special ids, chat template); slow, so the loader caches it."""
        directory, name = os.path.split(os.path.abspath(path))
        return cls(_auto_tokenizer().from_pretrained(directory, gguf_file=name), eos_token_ids)

    def save(self, directory: str) -> None:
        """Write tokenizer.json and friends so `from_pretrained(directory)` restores this tokenizer quickly."""
        self.hf.save_pretrained(directory)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """Render messages to the prompt text; template errors become ChatTemplateError (a 400, not a 500)."""
        if self.chat_template is None and kwargs.get("chat_template") is None:
            raise ChatTemplateError("this model has no chat template; use the completions API instead")
        try:
            return self.hf.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. the template adds a str to a content list
            raise ChatTemplateError(f"chat template error: {e}") from None


def _auto_tokenizer():
    """AutoTokenizer, imported on first use: its model registry costs seconds of start-up that a cached model
    (loaded through PreTrainedTokenizerFast) never needs."""
    from transformers import AutoTokenizer

    return AutoTokenizer
