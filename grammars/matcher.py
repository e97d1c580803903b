"""GrammarMatcher: one generation's position in a compiled grammar (mirrors xgrammar.GrammarMatcher).

The state is a stack of interned configuration ids, one per accepted token, so rollback pops and accepting a
token whose transition was seen before (by this or any other matcher of the grammar) is a dict lookup.
Growing the shared memo (a miss) happens under the memo's lock, so matchers may run on several threads.
Every call is defined after termination: accepts return False, the mask allows only stop tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from .compiler import CompiledGrammar
from .earley import DEAD


class GrammarMatcher:
    def __init__(
        self,
        compiled_grammar: CompiledGrammar,
        *,
        override_stop_tokens: list[int] | int | None = None,
        terminate_without_stop_token: bool = False,
        max_rollback_tokens: int = -1,
    ):
        if not isinstance(compiled_grammar, CompiledGrammar):
            raise TypeError(f"expected a CompiledGrammar, got {type(compiled_grammar).__name__}")
        self._cg = compiled_grammar
        self._space, self._masker, initial = compiled_grammar.current()
        self._vocab = self._masker.vocab
        self._vocab_size = compiled_grammar.tokenizer_info.vocab_size
        if isinstance(override_stop_tokens, int):
            override_stop_tokens = [override_stop_tokens]
        default_stop = compiled_grammar.tokenizer_info.stop_token_ids
        stop = default_stop if override_stop_tokens is None else list(override_stop_tokens)
        for t in stop:
            if not 0 <= t < self._vocab_size:
                raise ValueError(f"stop token id {t} is outside the vocabulary (size {self._vocab_size})")
        self.stop_token_ids: list[int] = list(stop)
        self._stop = frozenset(stop)
        self._own_masks: dict[int, np.ndarray] | None = None if self._stop == frozenset(default_stop) else {}
        self._terminate_without_stop = terminate_without_stop_token
        self.max_rollback_tokens = max_rollback_tokens
        self._hist = [initial]
        self._stopped_at: int | None = None
        self._bm: tuple | None = None

    def accept_token(self, token_id: int) -> bool:
        """Advances by one token; False (state unchanged) if the grammar forbids it or it is out of range."""
        if self._stopped_at is not None:
            return False
        cid = self._hist[-1]
        cfgs = self._space.configs
        cfg = cfgs[cid] if cid < len(cfgs) else None
        if cfg is None:
            cfg = self._space.config(cid)
        nid = cfg.tok.get(token_id)
        if nid is None:
            if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < self._vocab_size:
                return False
            if token_id in self._stop:
                if not cfg.can_end:
                    return False
                self._push(cid)
                self._stopped_at = len(self._hist) - 1
                return True
            u = int(self._vocab.tok_u[token_id])
            with self._space.lock:
                nid = DEAD if u < 0 else self._space.run(cid, self._vocab.strings[u])
            cfg.tok[token_id] = nid
        if nid < 0:
            return False
        self._push(nid)
        return True

    def _push(self, cid: int) -> None:
        h = self._hist
        h.append(cid)
        if self.max_rollback_tokens >= 0 and len(h) > self.max_rollback_tokens + 1:
            del h[: len(h) - self.max_rollback_tokens - 1]
            if self._stopped_at is not None:
                self._stopped_at = len(h) - 1

    def accept_string(self, input_str: str | bytes) -> bool:
        """Advances by the bytes of a string as one rollback step; False (state unchanged) if not allowed."""
        if self._stopped_at is not None:
            return False
        data = input_str.encode("utf-8") if isinstance(input_str, str) else bytes(input_str)
        with self._space.lock:
            nid = self._space.run(self._hist[-1], data)
        if nid < 0:
            return False
        self._push(nid)
        return True

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> bool:
        """Writes the allowed-token mask into row `index`; returns False when no token needs masking."""
        if self._bm is not None and self._bm[0] is bitmask:
            rows = self._bm[1]
        else:
            if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu":
                raise ValueError("bitmask must be an int32 tensor on the CPU")
            rows = bitmask.numpy()
            if rows.ndim == 1:
                rows = rows.reshape(1, -1)
            if rows.shape[1] != self._vocab.words:
                raise ValueError(f"bitmask rows have {rows.shape[1]} words, expected {self._vocab.words}")
            self._bm = (bitmask, rows)
        if self._stopped_at is not None:
            rows[index] = self._stop_mask()
            return True
        cid = self._hist[-1]
        cfgs = self._space.configs
        cfg = cfgs[cid] if cid < len(cfgs) else None
        if cfg is None:
            cfg = self._space.config(cid)
        mask = cfg.mask
        if mask is None:
            with self._space.lock:
                mask = self._masker.config_mask(cid)
        if self._own_masks is not None:
            own = self._own_masks.get(cid)
            if own is None:
                own = mask & ~self._masker.stop_words if cfg.can_end else mask
                if cfg.can_end:
                    own = own | self._stop_mask()
                self._own_masks[cid] = own
            rows[index] = own
            return not np.array_equal(own, self._masker.full)
        rows[index] = mask
        return cfg.need_apply

    def _stop_mask(self) -> np.ndarray:
        bits = np.zeros(self._vocab.words * 32, dtype=bool)
        bits[list(self._stop)] = True
        return np.packbits(bits, bitorder="little").view(np.int32)

    def find_jump_forward_string(self) -> str:
        """The longest string every continuation must start with (stopping where the grammar may end)."""
        if self._stopped_at is not None:
            return ""
        space = self._space
        cid = self._hist[-1]
        out = bytearray()
        with space.lock:
            while not space.can_end(cid):
                allowed = space.allowed(cid)
                if len(allowed) != 1:
                    break
                (b,) = allowed
                out.append(b)
                cid = space.step(cid, b)
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError as e:  # a partial character at either end is not a string
            return out[: e.start].decode("utf-8") if e.start else ""

    def rollback(self, num_tokens: int = 1) -> None:
        """Undoes the last num_tokens accepted tokens or strings."""
        if num_tokens < 0 or num_tokens > len(self._hist) - 1:
            raise ValueError(f"cannot roll back {num_tokens} tokens: only {len(self._hist) - 1} can be undone")
        if num_tokens:
            del self._hist[-num_tokens:]
            if self._stopped_at is not None and self._stopped_at >= len(self._hist):
                self._stopped_at = None

    def is_completed(self) -> bool:
        """The input so far is a complete sentence of the grammar (or a stop token was accepted)."""
        return self._stopped_at is not None or self._space.can_end(self._hist[-1])

    def is_terminated(self) -> bool:
        """A stop token was accepted, or (terminate_without_stop_token) the grammar is complete."""
        if self._stopped_at is not None:
            return True
        return self._terminate_without_stop and self._space.can_end(self._hist[-1])

    def reset(self) -> None:
        self._space, self._masker, initial = self._cg.current()
        self._own_masks = None if self._own_masks is None else {}
        self._hist = [initial]
        self._stopped_at = None
