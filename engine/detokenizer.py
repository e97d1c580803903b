"""Streaming text from generated token ids, plus the per-token strings and bytes of the OpenAI logprobs fields.

A token is not a unit of text: byte-level BPE splits one UTF-8 character over several tokens, and SentencePiece
tokens carry a leading-space marker the decoder drops at the start of a string. So each step decodes a short
window of recent ids twice, without and with the new token, and emits the difference; the window starts a few
tokens back (in the prompt at first) so leading spaces come out as in the full decode. While the window's text
ends in U+FFFD, a character is still incomplete: nothing is emitted and the window grows until it completes.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Tokens of context before the first output token; enough for any decoder's look-behind (SentencePiece's
# leading-space strip, byte-level characters of up to 4 bytes).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
_MAX_CONTINUATION_BYTES = 3  # a UTF-8 character spans at most 4 bytes, so at most 4 tokens


class IncrementalDetokenizer:
    """Feeds token ids one at a time and returns the text each one completes.

    Uses the Rust tokenizer's `decode` directly (no `clean_up_tokenization_spaces`, which rewrites text across
    token boundaries and so cannot be streamed; SmolLM2, Llama and Qwen tokenizers leave it off).
    """

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ):
        self._decode = hf_tokenizer.backend_tokenizer.decode
        self._skip_special = skip_special_tokens
        start = max(0, len(prompt_token_ids) - _CONTEXT_TOKENS)
        # Open the window on a character boundary: one opening mid-character decodes to U+FFFD, and byte-fallback
        # decoders then replace the whole run of byte tokens it belongs to, output bytes included.
        for _ in range(_MAX_CONTINUATION_BYTES):
            if start == 0 or not self._decode(prompt_token_ids[start:], skip_special_tokens=False).startswith(
                _REPLACEMENT
            ):
                break
            start -= 1
        self._ids = list(prompt_token_ids[start:])  # the decode window
        self._read = len(self._ids)  # window tokens whose text was already emitted
        self._pieces: list[str] = []

    def step(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[: self._read], skip_special_tokens=self._skip_special)
        full = self._decode(self._ids, skip_special_tokens=self._skip_special)
        if len(full) <= len(emitted) or full.endswith(_REPLACEMENT):
            return ""
        new = full[len(emitted) :]
        # Slide the window: the next step only needs the tokens of this emission as context.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._pieces.append(new)
        return new

    def flush(self) -> str:
        """The text still held back when the sequence ends: an incomplete trailing character, as U+FFFD.

        Afterwards `text` equals the full decode of the output; call it once, at the end.
        """
        emitted = self._decode(self._ids[: self._read], skip_special_tokens=self._skip_special)
        full = self._decode(self._ids, skip_special_tokens=self._skip_special)
        new = full[len(emitted) :]
        self._ids, self._read = [], 0
        if new:
            self._pieces.append(new)
        return new

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)


def token_text(hf_tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The token as text for the logprobs `token` field: its bytes as UTF-8, U+FFFD for part of a character.

    Built from the bytes rather than a one-token decode, which would drop a SentencePiece leading space.
    """
    return bytes(token_bytes(hf_tokenizer, token_id)).decode("utf-8", errors="replace")


def token_bytes(hf_tokenizer: PreTrainedTokenizerBase, token_id: int) -> list[int]:
    """The token's raw UTF-8 bytes for the logprobs `bytes` field, exact even for part of a character."""
    vocab = _vocab_info(hf_tokenizer)
    piece = hf_tokenizer.backend_tokenizer.id_to_token(token_id)
    if piece is None:
        raise ValueError(f"token id {token_id} is not in the vocabulary")
    if token_id in vocab.added_ids:  # added tokens are stored as plain text
        return list(piece.encode("utf-8"))
    if vocab.kind == "byte_level":
        return [vocab.byte_decoder[c] for c in piece]
    if vocab.kind == "byte_fallback":
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        return list(piece.replace("\u2581", " ").encode("utf-8"))
    return list(hf_tokenizer.backend_tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class _VocabInfo:
    kind: str  # "byte_level" (GPT-2 style) | "byte_fallback" (SentencePiece style) | "text"
    byte_decoder: dict[str, int]  # byte_level only: vocabulary character -> byte
    added_ids: frozenset[int]


@functools.lru_cache(maxsize=8)
def _vocab_info(hf_tokenizer: PreTrainedTokenizerBase) -> _VocabInfo:
    """How vocabulary strings map to bytes, read once per tokenizer from its decoder definition."""
    backend = hf_tokenizer.backend_tokenizer
    # The decoder's pickled state is its JSON definition (the whole tokenizer's would serialise the vocabulary).
    types = _decoder_types(json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {})
    added = frozenset(backend.get_added_tokens_decoder())
    if "ByteLevel" in types:
        return _VocabInfo("byte_level", {c: b for b, c in bytes_to_unicode().items()}, added)
    if "ByteFallback" in types:
        return _VocabInfo("byte_fallback", {}, added)
    return _VocabInfo("text", {}, added)


def _decoder_types(decoder: dict) -> set[str]:
    types = {decoder.get("type")}
    for child in decoder.get("decoders") or []:
        types |= _decoder_types(child)
    return types
