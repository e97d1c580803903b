"""treadle's structured-generation engine: EBNF / JSON schema / regex / structural tags -> token masks.

The public names mirror xgrammar's so engines and benchmarks can swap one for the other.
"""

from .bitmask import (
    allocate_token_bitmask,
    apply_token_bitmask_inplace,
    bitmask_dtype,
    get_bitmask_shape,
    reset_token_bitmask,
)
from .compiler import CompiledGrammar, GrammarCompiler
from .ebnf import Grammar, parse_ebnf
from .errors import GrammarError
from .matcher import GrammarMatcher
from .tokenizer_info import TokenizerInfo, VocabType

__all__ = [
    "CompiledGrammar",
    "Grammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "TokenizerInfo",
    "VocabType",
    "allocate_token_bitmask",
    "apply_token_bitmask_inplace",
    "bitmask_dtype",
    "get_bitmask_shape",
    "parse_ebnf",
    "reset_token_bitmask",
]
