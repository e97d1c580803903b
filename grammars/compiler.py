"""GrammarCompiler: every front-end lowers to EBNF, then to rule automata; token masks are built lazily.

Compiling does no per-vocabulary work: masks are computed on first use by matchers and memoized in the
CompiledGrammar (shared by all its matchers), and token classifications of rule positions are shared by every
grammar this compiler produces (keyed by each rule's structural hash), so a sub-schema that recurs across
tool sets is classified once. Whole compiled grammars are cached by their input.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict

import numpy as np

from .automata import GrammarIR
from .earley import ROOT, Space
from .ebnf import Grammar, parse_ebnf
from .errors import GrammarError
from .mask import Masker
from .tokenizer_info import TokenizerInfo

MAX_CONFIGS = 50_000  # ~1.5 KB each (transition row, items, masks shared by reference)


class CompiledGrammar:
    """A grammar ready for matching against one tokenizer; holds the shared, lazily grown mask memo."""

    def __init__(self, grammar: Grammar, tokenizer_info: TokenizerInfo, class_cache: dict):
        self.grammar = grammar
        self.tokenizer_info = tokenizer_info
        self.ir = GrammarIR(grammar)
        self._class_cache = class_cache
        vocab = tokenizer_info.index
        stop = np.zeros(vocab.words * 32, dtype=bool)
        stop[[i for i in tokenizer_info.stop_token_ids if i < vocab.vocab_size]] = True
        self._stop_words = np.packbits(stop, bitorder="little").view(np.int32)
        self._lock = threading.Lock()
        self._new_space()

    def _new_space(self) -> None:
        self.space = Space(self.ir)
        self.masker = Masker(self.space, self.tokenizer_info.index, self._class_cache, self._stop_words)
        self.masker.prepare()
        self.initial = self.space.initial(self.ir.start(self.ir.root), 0, ROOT)

    def current(self) -> tuple[Space, Masker, int]:
        """The memo new matchers should use: (space, masker, initial configuration).

        The memo grows with every configuration any matcher reaches; past MAX_CONFIGS new matchers get a
        fresh one, while matchers already running keep theirs until they are dropped.
        """
        with self._lock:
            if self.space.n_configs > MAX_CONFIGS:
                self._new_space()
            return self.space, self.masker, self.initial

    @property
    def memory_size_bytes(self) -> int:
        """A rough size of the grammar automata and the memo grown so far."""
        sp = self.space
        masks = sum(m.nbytes for m, _ in sp.shape_masks)
        return int(sp.nbytes + masks + sum(a.nbytes for a in sp.irt) + 200 * self.ir.n_states)


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise GrammarError(f"a JSON schema must be a str, dict or pydantic model class, got {type(schema).__name__}")


class GrammarCompiler:
    """Compiles grammars for one tokenizer; mirrors xgrammar.GrammarCompiler.

    `max_threads` is accepted for API compatibility: compilation is lazy and single-threaded.
    `cache_enabled=False` shares nothing between compiles (no grammar cache, no shared classifications);
    `cache_limit_bytes` bounds the compiled-grammar cache (-1: unbounded).
    """

    def __init__(
        self,
        tokenizer_info: TokenizerInfo,
        *,
        max_threads: int = 8,
        cache_enabled: bool = True,
        cache_limit_bytes: int = -1,
    ):
        if not isinstance(tokenizer_info, TokenizerInfo):
            raise TypeError(f"tokenizer_info must be a TokenizerInfo, got {type(tokenizer_info).__name__}")
        self.tokenizer_info = tokenizer_info
        self.max_threads = max_threads
        self.cache_enabled = cache_enabled
        self.cache_limit_bytes = cache_limit_bytes
        self._grammars: OrderedDict = OrderedDict()
        self._classes: dict = {}
        # built once per tokenizer, before any timed compile, with the trie walk's tables (~20 ms) and every
        # string's token words, which would otherwise land in the first mask of the first grammar
        self._vocab = tokenizer_info.index
        self._flat = self._vocab.flat
        self._all_words = self._vocab.all_words

    def _cached(self, key, build) -> CompiledGrammar:
        if self.cache_enabled:
            hit = self._grammars.get(key)
            if hit is not None:
                self._grammars.move_to_end(key)
                return hit
        compiled = CompiledGrammar(build(), self.tokenizer_info, self._classes if self.cache_enabled else {})
        if self.cache_enabled:
            self._grammars[key] = compiled
            if self.cache_limit_bytes >= 0:
                while len(self._grammars) > 1 and self.get_cache_size_bytes() > self.cache_limit_bytes:
                    self._grammars.popitem(last=False)
        return compiled

    def compile_grammar(self, grammar: str | Grammar, *, root_rule_name: str = "root") -> CompiledGrammar:
        if isinstance(grammar, Grammar):
            return self._cached(("grammar", str(grammar), grammar.root), lambda: grammar)
        return self._cached(("ebnf", grammar, root_rule_name), lambda: parse_ebnf(grammar, root_rule_name))

    def compile_json_schema(
        self,
        schema,
        *,
        any_whitespace: bool = True,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        strict_mode: bool = True,
        max_whitespace_cnt: int | None = None,
    ) -> CompiledGrammar:
        from .json_schema import json_schema_to_ebnf

        text = _schema_text(schema)
        opts = dict(any_whitespace=any_whitespace, indent=indent, separators=separators,
                    strict_mode=strict_mode, max_whitespace_cnt=max_whitespace_cnt)
        key = ("json_schema", text, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        return self._cached(key, lambda: parse_ebnf(json_schema_to_ebnf(text, **opts)))

    def compile_builtin_json_grammar(self) -> CompiledGrammar:
        from .builtin import builtin_json_ebnf

        return self._cached(("builtin_json",), lambda: parse_ebnf(builtin_json_ebnf()))

    def compile_regex(self, pattern: str) -> CompiledGrammar:
        from .regex import regex_to_ebnf

        return self._cached(("regex", pattern), lambda: parse_ebnf(regex_to_ebnf(pattern)))

    def compile_structural_tag(self, *args, **kwargs) -> CompiledGrammar:
        """`compile_structural_tag(structural_tag)` (JSON str/dict) or legacy `(tags, triggers)`."""
        from .structural_tag import structural_tag_args_to_json, structural_tag_to_grammar

        text = structural_tag_args_to_json(args, kwargs)
        return self._cached(("structural_tag", text), lambda: structural_tag_to_grammar(text))

    def clear_cache(self) -> None:
        self._grammars.clear()
        self._classes.clear()

    def get_cache_size_bytes(self) -> int:
        grammars = sum(g.memory_size_bytes for g in self._grammars.values())
        classes = sum(sum(a.nbytes for a in v) for v in self._classes.values())
        return grammars + classes + sys.getsizeof(self._classes)
