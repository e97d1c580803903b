"""The repo's grammar suite (benchmarks/grammar_suite): every instance is valid and accepted, treadle's
token masks equal xgrammar's on the same EBNF, and next-byte sets equal llguidance's native JSON-schema
and regex engines up to the documented policy differences listed in `LLGUIDANCE_DIFFERENCES`."""

from __future__ import annotations

import json
import re

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest
import xgrammar as xgr

import treadle.grammars as tg
from grammars_frontend_testing import BYTE_VOCAB, accepts, compact_json, load_suite, smollm2_tokenizer, validator
from treadle.grammars.builtin import builtin_json_ebnf
from treadle.grammars.json_schema import json_schema_to_ebnf
from treadle.grammars.regex import regex_to_ebnf

CASES = load_suite()
IDS = [case["name"] for case in CASES]
MAX_WALK_TOKENS = 200
# xgrammar needs seconds per mask inside `json_char{0,10000}`; walk only into the start of that string.
XGRAMMAR_SLOW_WALK = {"string_lengths": 25}


def case_ebnf(case: dict) -> str:
    kind = case["kind"]
    if kind == "json_schema":
        return json_schema_to_ebnf(case["schema"])
    if kind == "regex":
        return regex_to_ebnf(case["regex"])
    if kind == "ebnf":
        return case["grammar"]
    return builtin_json_ebnf()


def case_texts(case: dict) -> list[str]:
    if case["kind"] in ("json_schema", "builtin_json"):
        return [compact_json(v) for v in case["instances"]]
    return list(case["instances"])


def test_suite_is_broad():
    kinds = {case["kind"] for case in CASES}
    assert len(CASES) >= 30 and kinds == {"json_schema", "regex", "ebnf", "builtin_json"}
    assert all(case["instances"] and case["description"] for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_instances_are_valid_and_accepted(case):
    ebnf = case_ebnf(case)
    if case["kind"] == "json_schema":
        check = validator(case["schema"])
        for value in case["instances"]:
            assert check.is_valid(value), value
            # Any layout json.dumps prints is accepted, too.
            assert accepts(ebnf, json.dumps(value, indent=2, ensure_ascii=False))
    if case["kind"] == "regex":
        assert all(re.fullmatch(case["regex"], text, re.ASCII) for text in case["instances"])
    for text in case_texts(case):
        assert accepts(ebnf, text), text


@pytest.fixture(scope="module")
def engines():
    tokenizer = smollm2_tokenizer()
    ours = tg.GrammarCompiler(tg.TokenizerInfo.from_huggingface(tokenizer))
    reference = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer), max_threads=2)
    return tokenizer, ours, reference


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_token_masks_equal_xgrammar_on_the_same_grammar(case, engines):
    tokenizer, ours, reference = engines
    ebnf = case_ebnf(case)
    compiled, reference_compiled = ours.compile_grammar(ebnf), reference.compile_grammar(ebnf)
    vocab = compiled.tokenizer_info.vocab_size
    text = case_texts(case)[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    limit = XGRAMMAR_SLOW_WALK.get(case["name"], MAX_WALK_TOKENS)
    walk_to_end = len(ids) <= limit
    matcher, reference_matcher = tg.GrammarMatcher(compiled), xgr.GrammarMatcher(reference_compiled)
    mask, reference_mask = tg.allocate_token_bitmask(1, vocab), xgr.allocate_token_bitmask(1, vocab)
    # Documented difference: xgrammar lets special tokens (<|im_start|>, ...) spell string content;
    # treadle never lets grammar text produce a special token. Compare the other tokens exactly.
    keep = np.ones(vocab, dtype=bool)
    keep[[i for i in compiled.tokenizer_info.special_token_ids if i not in compiled.tokenizer_info.stop_token_ids]] = False
    keep_words = np.packbits(keep, bitorder="little").view(np.int32)
    for step, token in enumerate(ids[:limit] + ([tokenizer.eos_token_id] if walk_to_end else [])):
        mask.fill_(0), reference_mask.fill_(0)
        matcher.fill_next_token_bitmask(mask)
        reference_matcher.fill_next_token_bitmask(reference_mask)
        differ = np.nonzero((mask.numpy()[0] ^ reference_mask.numpy()[0]) & keep_words)[0]
        assert differ.size == 0, f"step {step}: masks differ in words {differ[:5]}"
        assert matcher.accept_token(token) and reference_matcher.accept_token(token), f"step {step}"
    assert matcher.is_terminated() == walk_to_end


# Where llguidance's own JSON-schema and regex engines legitimately differ from ours, as predicates on
# (bytes so far, next byte, which side allows it). Each is a documented policy, not a tolerance.
LLGUIDANCE_DIFFERENCES = {
    "raw DEL in strings: JSON allows U+007F unescaped, llguidance does not": lambda prefix, b, ours: ours and b == 0x7F,
    "the \\/ escape: valid JSON, llguidance does not generate it": lambda prefix, b, ours: ours and b == ord("/") and prefix.endswith(b"\\"),
    "negative zero: our integers are canonical, llguidance allows -0": lambda prefix, b, ours: not ours and b == ord("0") and prefix.endswith(b"-"),
    "leap second :60: we follow the rfc3339 validator, llguidance allows it": lambda prefix, b, ours: not ours and b == ord("6") and re.search(rb"\d\d:\d\d:$", prefix) is not None,
    "\\d is ASCII for us (ECMA-262), Unicode digits for llguidance": lambda prefix, b, ours: not ours and b >= 0x80,
}
# Suite cases where llguidance itself cannot follow a valid instance or a schema feature.
LLGUIDANCE_GAPS = {
    "numeric_bounds": "llguidance rejects some in-range decimals (e.g. -273.1 under minimum -273.15)",
    "string_formats": "llguidance's ipv6 format lacks IPv4-suffixed addresses such as ::ffff:10.0.0.1",
    "allof_merge": "strict mode closes the merged allOf object; in llguidance only each branch could be closed",
}


class _ByteTokenizer:
    """A 256-byte vocabulary for llguidance, so its masks are next-byte sets like ours."""

    eos_token_id = 256
    bos_token_id = None
    tokens = BYTE_VOCAB
    special_token_ids = [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


def _strict(schema, in_all_of: bool = False):
    """xgrammar-style strict mode spelled out for llguidance: declared properties (prefix items) close
    the object (array). allOf branches stay open: closing each would forbid the others' properties."""
    if isinstance(schema, list):
        return [_strict(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const") else _strict(v, k == "allOf")) for k, v in schema.items()}
    if not in_all_of and "allOf" not in out:
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if "prefixItems" in out and "items" not in out:
            out["items"] = False
    return out


def _allowed(bits: np.ndarray) -> set[int]:
    return set(np.nonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:257])[0].tolist())


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] in ("json_schema", "regex") and c["name"] not in LLGUIDANCE_GAPS], ids=lambda c: c["name"])
def test_next_bytes_match_llguidance_up_to_documented_differences(case):
    byte_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    ours = tg.GrammarCompiler(tg.TokenizerInfo(BYTE_VOCAB, stop_token_ids=[256]))
    if case["kind"] == "regex":
        compiled = ours.compile_regex(case["regex"])
        grammar = llguidance.grammar_from("regex", case["regex"])
        texts = case["instances"]
    else:
        compiled = ours.compile_json_schema(case["schema"])
        options = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}", "coerce_one_of": True, "json_allow_general_unicode_escapes": True}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_strict(case["schema"]), defaults=options)
        texts = [json.dumps(v, ensure_ascii=False) for v in case["instances"]]
    mask = tg.allocate_token_bitmask(1, 257)
    reference_mask = llg_numpy.allocate_token_bitmask(1, byte_tokenizer.vocab_size)
    for text in texts:
        data = text.encode()
        matcher = tg.GrammarMatcher(compiled)
        reference = llguidance.LLMatcher(byte_tokenizer, grammar, log_level=0)
        assert not reference.is_error(), reference.get_error()
        for i, byte in enumerate([*data, 256]):
            matcher.fill_next_token_bitmask(mask)
            llg_numpy.fill_next_token_bitmask(reference, reference_mask)
            allowed, reference_allowed = _allowed(mask.numpy()[0]), _allowed(reference_mask[0])
            prefix = data[:i]
            for b, ours_only in [(b, True) for b in allowed - reference_allowed] + [(b, False) for b in reference_allowed - allowed]:
                assert any(rule(prefix, b, ours_only) for rule in LLGUIDANCE_DIFFERENCES.values()), (
                    f"after {prefix[-40:]!r}: byte {b} allowed only by {'treadle' if ours_only else 'llguidance'}"
                )
            if byte == 256:
                break
            assert matcher.accept_token(byte) and reference.consume_token(byte), f"after {prefix[-40:]!r}"
