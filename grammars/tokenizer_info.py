"""What the grammar engine needs from a tokenizer: each token id's raw bytes, stop and special tokens.

Byte-level BPE vocabularies (GPT-2's byte-to-unicode alphabet) and SentencePiece ones (`▁` for space,
`<0xXX>` byte-fallback tokens) are decoded to the exact bytes each token contributes to the output, so the
byte-level matcher never sees tokenizer-specific spellings. Special tokens never match grammar text; stop
tokens are allowed exactly when the grammar can end.
"""

from __future__ import annotations

import enum
import json
import re
from functools import cached_property

from .vocab import VocabIndex

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_STOP_SPELLINGS = {b"</s>", b"<|endoftext|>", b"<|eot_id|>", b"<|im_end|>", b"<|end|>", b"<eos>", b"<|end_of_text|>"}


class VocabType(enum.IntEnum):
    RAW = 0  # tokens are their own text (tiktoken-style)
    BYTE_FALLBACK = 1  # SentencePiece: "▁" is a space, "<0xXX>" is one byte
    BYTE_LEVEL = 2  # GPT-2 byte-level BPE: each byte is spelled as one printable unicode character


def _gpt2_unicode_to_byte() -> dict[str, int]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_U2B = _gpt2_unicode_to_byte()


def _decode(token: str, vocab_type: VocabType) -> bytes:
    if vocab_type == VocabType.BYTE_LEVEL:
        try:
            return bytes(_U2B[ch] for ch in token)
        except KeyError:  # not in the byte alphabet: an added token spelled as plain text
            return token.encode("utf-8")
    if vocab_type == VocabType.BYTE_FALLBACK:
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")
    return token.encode("utf-8")


class TokenizerInfo:
    """Decoded vocabulary plus stop/special token ids; `vocab_size` is the model's logits width."""

    def __init__(
        self,
        encoded_vocab: list[str] | list[bytes],
        vocab_type: VocabType = VocabType.RAW,
        *,
        vocab_size: int | None = None,
        stop_token_ids: list[int] | int | None = None,
        add_prefix_space: bool = False,
        special_token_ids: list[int] | None = None,
        added_tokens: dict[int, str] | None = None,
    ):
        vocab_type = VocabType(vocab_type)
        vocab_size = len(encoded_vocab) if vocab_size is None else int(vocab_size)
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if isinstance(stop_token_ids, int):
            stop_token_ids = [stop_token_ids]
        if stop_token_ids is not None and len(stop_token_ids) == 0:
            raise ValueError("stop_token_ids cannot be empty")
        added_tokens = added_tokens or {}
        decoded = []
        for i, tok in enumerate(encoded_vocab[:vocab_size]):
            if isinstance(tok, bytes):
                decoded.append(tok)
            elif i in added_tokens:
                decoded.append(tok.encode("utf-8"))
            else:
                decoded.append(_decode(tok, vocab_type))
        decoded.extend(b"" for _ in range(vocab_size - len(decoded)))
        self.vocab_type = vocab_type
        self.vocab_size = vocab_size
        self.add_prefix_space = add_prefix_space
        self.decoded_vocab: list[bytes] = decoded
        self.special_token_ids: list[int] = sorted(i for i in (special_token_ids or []) if 0 <= i < vocab_size)
        if stop_token_ids is None:  # no tokenizer config to ask: look for the usual end-of-sequence spellings
            stop_token_ids = [i for i, b in enumerate(decoded) if b in _STOP_SPELLINGS]
        for i in stop_token_ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"stop token id {i} is outside the vocabulary (size {vocab_size})")
        self.stop_token_ids: list[int] = list(stop_token_ids)

    @classmethod
    def from_huggingface(
        cls, tokenizer, vocab_size: int | None = None, stop_token_ids: list[int] | int | None = None
    ) -> "TokenizerInfo":
        """Builds the info from a transformers tokenizer (fast or slow), detecting the vocabulary type."""
        try:
            vocab = tokenizer.get_vocab()
        except AttributeError as e:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no get_vocab()") from e
        size = max(len(vocab), max(vocab.values()) + 1)
        vocab_size = size if vocab_size is None else vocab_size
        encoded = [""] * vocab_size
        for tok, i in vocab.items():
            if i < vocab_size:
                encoded[i] = tok
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        special = [i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special]
        special += [i for i in getattr(tokenizer, "all_special_ids", []) if i not in special]
        if stop_token_ids is None and getattr(tokenizer, "eos_token_id", None) is not None:
            stop_token_ids = [tokenizer.eos_token_id]
        return cls(
            encoded,
            cls._detect_vocab_type(tokenizer, vocab),
            vocab_size=vocab_size,
            stop_token_ids=stop_token_ids,
            special_token_ids=special,
            added_tokens=added,
        )

    @staticmethod
    def _detect_vocab_type(tokenizer, vocab: dict[str, int]) -> VocabType:
        if sum(1 for t in vocab if _BYTE_TOKEN.match(t)) >= 256:
            return VocabType.BYTE_FALLBACK
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            decoder = json.loads(backend.to_str()).get("decoder") or {}
            kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
            if "ByteLevel" in kinds:
                return VocabType.BYTE_LEVEL
            if "ByteFallback" in kinds or "Metaspace" in kinds:
                return VocabType.BYTE_FALLBACK
        if "\u0120" in "".join(list(vocab)[:5000]):  # "Ġ": GPT-2's spelling of a space
            return VocabType.BYTE_LEVEL
        return VocabType.RAW

    @cached_property
    def index(self) -> VocabIndex:
        """The vocabulary trie over every token that grammar text may produce (not special, not stop)."""
        return VocabIndex(self.decoded_vocab, self.vocab_size, set(self.special_token_ids) | set(self.stop_token_ids))
