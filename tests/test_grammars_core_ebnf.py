"""EBNF parsing and byte-level matching, checked against xgrammar's matcher (a reference we did not write).

No tokenizer here: grammars are compiled against a tiny byte vocabulary and strings are fed with
accept_string, so acceptance is compared byte for byte, prefix by prefix.
"""

import random

import pytest
import xgrammar as xgr
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle.grammars import GrammarCompiler, GrammarError, GrammarMatcher, TokenizerInfo, parse_ebnf

# one token per byte value, plus a stop token, so token-level calls are byte-level calls
BYTE_VOCAB = [bytes([b]) for b in range(256)] + [b"<eos>"]
_OURS = GrammarCompiler(TokenizerInfo(BYTE_VOCAB, stop_token_ids=[256], special_token_ids=[256]))
_XGR = xgr.GrammarCompiler(xgr.TokenizerInfo([]), max_threads=1, cache_enabled=False)

GRAMMARS = {
    "alternation": ('root ::= "ab" | "ac" | "b"', "abc"),
    "left_recursion": ('root ::= root "a" | "b"', "ab"),
    "right_recursion": ('root ::= "a" root | ""', "ab"),
    "ambiguous_expr": ('root ::= e\ne ::= e "+" e | e "*" e | "(" e ")" | [0-9]', "1+*()"),
    "nested_repetition": ('root ::= ("a" [bc]* "d")+ ("x" | "y")?', "abcdxy"),
    "bounded_small": ('root ::= [ab]{2,4} "c"', "abc"),
    "bounded_counter": ('root ::= "a"{20,40} "b"', "ab"),
    "bounded_group_counter": ('root ::= ("xy" | "z"){0,25} "."', "xyz."),
    "bounded_rule_counter": ('root ::= item{3,30}\nitem ::= "[" [0-9]* "]"', "[]0"),
    "exact_count": ('root ::= [0-9]{3} "-" [0-9]{4}', "0-9"),
    "open_lower_bound": ('root ::= "a"{18,} "b"', "ab"),
    "unicode_classes": ('root ::= [^"\\\\]* "\\""', 'a"\\é€😀'),
    "unicode_ranges": ('root ::= [α-ω]+ [\\u4e00-\\u9fff]?', "αωx中"),
    "nullable_chain": ('root ::= a b c "!"\na ::= "a"?\nb ::= "b"*\nc ::= a b', "ab!"),
    "json_like": (
        'root ::= value\nvalue ::= object | array | "true" | [0-9]+\n'
        'object ::= "{" ws (pair ("," ws pair)*)? "}"\npair ::= "\\"" [a-z]* "\\"" ws ":" ws value\n'
        'array ::= "[" ws (value ws ("," ws value ws)*)? "]"\nws ::= [ \\n]*',
        '{}[]",: \na1true',
    ),
}


def _random_strings(alphabet: str, rng: random.Random, n: int = 60) -> list[str]:
    return [""] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _prefix_results(matcher, text: str) -> list[tuple[bool, bool]]:
    """(accepted, complete) after each character, stopping at the first rejection."""
    out = []
    for ch in text:
        ok = matcher.accept_string(ch)
        out.append((ok, ok and matcher.is_completed()))
        if not ok:
            break
    return out


def _compare(ebnf: str, texts) -> None:
    ours = _OURS.compile_grammar(ebnf)
    ref = _XGR.compile_grammar(ebnf)
    for text in texts:
        m, x = GrammarMatcher(ours), xgr.GrammarMatcher(ref)
        assert m.is_completed() == x.is_completed(), (ebnf, "")
        assert _prefix_results(m, text) == _prefix_results(x, text), (ebnf, text)


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_matches_xgrammar_byte_by_byte(name):
    ebnf, alphabet = GRAMMARS[name]
    rng = random.Random(name)
    texts = _random_strings(alphabet, rng)
    if name == "bounded_counter":
        texts += ["a" * n + "b" for n in (19, 20, 33, 40, 41)]
    if name == "bounded_rule_counter":
        texts += ["[0]" * n for n in (2, 3, 30, 31)]
    if name == "open_lower_bound":
        texts += ["a" * n + "b" for n in (17, 18, 60)]
    _compare(ebnf, texts)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="ab(){}+*0123 ", max_size=14))
def test_random_strings_expr_grammar(text):
    _compare(GRAMMARS["ambiguous_expr"][0], [text])


@pytest.mark.parametrize(
    "ebnf, fragment",
    [
        ('root ::= "a" |', "line 1, column 15: expected an expression"),
        ('root ::= "abc', "unterminated string literal"),
        ("root ::= [a-", "unterminated character class"),
        ('root ::= "a"{3,2}', "below lower bound"),
        ('root ::= "a"{,3}', "expected an integer"),
        ("root ::= undefined_rule", "'undefined_rule' is not defined"),
        ('root ::= "a"\nroot ::= "b"', "defined twice"),
        ('root ::= "\\q"', "unknown escape"),
        ('root ::= ("a"', "expected ')'"),
        ("root ::= [z-a]", "reversed"),
        ('rule ::= "a"', "no root rule 'root'"),
        ('root ::= "a" x\nx ::= "b" x', "language is empty"),
        ("root ::= 'a'", "unexpected character"),
    ],
)
def test_bad_grammars_raise_clear_errors(ebnf, fragment):
    with pytest.raises(GrammarError) as e:
        _OURS.compile_grammar(ebnf)
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


def test_error_position_on_later_line():
    with pytest.raises(GrammarError, match="line 3, column 11"):
        parse_ebnf('root ::= a\na ::= "x"\nb ::= "y" )')


def test_dialect_features_parse():
    g = parse_ebnf(
        '# comment\nroot ::= "\\x41\\u00e9\\t" [\\]\\-^a] r-1 (= "z")  # trailing\n'
        'r-1 ::= "q"{2} "r"{1,} "s"{0,3}\n  "t"'
    )
    assert set(g.rules) == {"root", "r-1"}
    assert "root" in g.lookaheads
    m = GrammarMatcher(_OURS.compile_grammar(g))
    assert m.accept_string("Aé\t^qqrrst") and m.is_completed()


def test_rollback_equals_rerun():
    cg = _OURS.compile_grammar(GRAMMARS["json_like"][0])
    text = '{"ab": [1, 22, {"c": true}], "d": 7}'
    rng = random.Random(0)
    m = GrammarMatcher(cg)
    positions = [0]
    for _ in range(60):
        pos = positions[-1]
        if pos < len(text) and (len(positions) == 1 or rng.random() < 0.7):
            new = min(len(text), pos + rng.randint(1, 3))
            assert m.accept_string(text[pos:new])
            positions.append(new)
        else:
            n = rng.randint(1, len(positions) - 1)
            m.rollback(n)
            del positions[-n:]
        pos = positions[-1]
        fresh = GrammarMatcher(cg)
        assert fresh.accept_string(text[:pos])
        assert fresh.find_jump_forward_string() == m.find_jump_forward_string()
        assert fresh.is_completed() == m.is_completed()
        for probe in ("}", "]", ",", " ", "1", '"'):
            ok = m.accept_string(probe)
            assert ok == GrammarMatcher(cg).accept_string(text[:pos] + probe)
            if ok:
                m.rollback(1)
    with pytest.raises(ValueError):
        m.rollback(len(positions))


def test_max_rollback_tokens_bounds_history():
    m = GrammarMatcher(_OURS.compile_grammar('root ::= "abcdef"'), max_rollback_tokens=2)
    for ch in "abcd":
        assert m.accept_string(ch)
    m.rollback(2)
    with pytest.raises(ValueError):
        m.rollback(1)
    assert m.accept_string("cdef") and m.is_completed()


@pytest.mark.parametrize(
    "ebnf, prefix, expected",
    [
        ('root ::= "abc" [d-f] "xyz"', "", "abc"),
        ('root ::= "abc" [d-f] "xyz"', "abcd", "xyz"),
        ('root ::= "{" ws "\\"key\\"" ws ":"\nws ::= " "?', "{", ""),
        ('root ::= "{" "\\"key\\":" " "* "1"', "{", '"key":'),
        ('root ::= "é" "x"', "", "éx"),
        ('root ::= "ab" | "ac"', "", "a"),
        ('root ::= "a" "b"?', "a", ""),
        ('root ::= x "!"\nx ::= "ab" | "ab" "c"', "", "ab"),
    ],
)
def test_jump_forward_is_forced_continuation(ebnf, prefix, expected):
    m = GrammarMatcher(_OURS.compile_grammar(ebnf))
    assert m.accept_string(prefix)
    assert m.find_jump_forward_string() == expected
    x = xgr.GrammarMatcher(_XGR.compile_grammar(ebnf))
    assert x.accept_string(prefix)
    assert x.find_jump_forward_string() == expected


def test_jump_forward_stops_inside_partial_character():
    m = GrammarMatcher(_OURS.compile_grammar('root ::= "é" "x"'))
    assert m.accept_string(b"\xc3")
    assert m.find_jump_forward_string() == ""


def test_tag_dispatch_free_text_trigger_and_loop():
    cg = _OURS.compile_grammar(
        'root ::= TagDispatch(("<t>", t), ("<u", u), loop_after_dispatch=true, excludes=("STOP",))\n'
        't ::= [0-9]+ "</t>"\nu ::= ">ok</u>"'
    )
    for text, ok in [
        ("free text", True), ("a <t>12</t> b <u>ok</u>", True), ("<t>x", False), ("<t", True),
        ("text STOP", False), ("<t>1", True), ("ST", True),
    ]:
        assert GrammarMatcher(cg).accept_string(text) == ok, text
    m = GrammarMatcher(cg)
    assert m.accept_string("x<t>1") and not m.is_completed()
    assert m.accept_string("</t>") and m.is_completed()
    once = _OURS.compile_grammar('root ::= TagDispatch(("<t>", t), loop_after_dispatch=false)\nt ::= "1"')
    m = GrammarMatcher(once)
    assert m.accept_string("hi <t>1") and m.is_completed()
    assert not m.accept_string("more")


def test_memo_is_replaced_past_its_limit_without_disturbing_running_matchers(monkeypatch):
    import treadle.grammars.compiler as compiler_mod

    cg = GrammarCompiler(_OURS.tokenizer_info).compile_grammar(GRAMMARS["json_like"][0])
    running = GrammarMatcher(cg)
    assert running.accept_string('{"a": [1')
    monkeypatch.setattr(compiler_mod, "MAX_CONFIGS", 3)
    fresh = GrammarMatcher(cg)
    assert fresh._space is not running._space
    assert running.accept_string(', 2]}') and running.is_completed()
    assert fresh.accept_string('{"a": [1, 2]}') and fresh.is_completed()


def test_matchers_on_threads_agree_with_a_single_thread():
    import threading

    import torch

    from treadle.grammars import allocate_token_bitmask

    texts = ['{"ab": [1, 22, {"c": true}], "d": 7}', '[{"x": []}, 5, true]', '{"q": {"r": {"s": [9]}}}']
    info = _OURS.tokenizer_info

    def masks(cg, text):
        m, bm, out = GrammarMatcher(cg), allocate_token_bitmask(1, info.vocab_size), []
        for ch in text.encode():
            m.fill_next_token_bitmask(bm)
            out.append(bm.clone())
            assert m.accept_token(ch)
        return out

    expected = {t: masks(GrammarCompiler(info).compile_grammar(GRAMMARS["json_like"][0]), t) for t in texts}
    shared = GrammarCompiler(info).compile_grammar(GRAMMARS["json_like"][0])
    results: dict = {}

    def work(i):
        results[i] = [(t, masks(shared, t)) for t in texts[i % 3 :] + texts[: i % 3]]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for runs in results.values():
        for t, got in runs:
            assert all(torch.equal(a, b) for a, b in zip(got, expected[t]))


def test_rule_hash_is_structural():
    """Classifications are shared across grammars by rule hash: equal for the same sub-grammar under other
    names and numbering (on a cycle too), different when one byte or one bound differs."""
    from treadle.grammars.automata import GrammarIR

    def h(ebnf, rule, shared=False):
        ir = GrammarIR(parse_ebnf(ebnf))
        if shared:  # rows sliced from the parser's whole-grammar table, as compiled grammars hash them
            ir.share_byte_table(ir.byte_table())
        return ir.rule_hash(ir.rule_names.index(rule))

    value = 'v ::= "[" ws (v ("," ws v)*)? "]" | [0-9]+ | s\ns ::= "\\"" [a-z]{0,8} "\\""\nws ::= [ ]*'
    same = 'root ::= "x" q\nq ::= "[" sp (q ("," sp q)*)? "]" | [0-9]+ | t\nsp ::= [ ]*\nt ::= "\\"" [a-z]{0,8} "\\""'
    assert h("root ::= v\n" + value, "v") == h(same, "q") == h(same, "q", shared=True)
    assert h("root ::= v\n" + value, "s") == h(same, "t")
    assert h("root ::= v\n" + value, "v") != h("root ::= v\n" + value.replace("[0-9]+", "[0-8]+"), "v")
    assert h("root ::= v\n" + value, "s") != h("root ::= v\n" + value.replace("{0,8}", "{0,9}"), "s")
    wide = 'root ::= u "."\nu ::= "<" [^>]* ">" u?'
    assert h(wide, "u") == h('root ::= "!" w\nw ::= "<" [^>]* ">" w?', "w", shared=True)
    assert h(wide, "u") != h('root ::= "!" w\nw ::= "<" [^<]* ">" w?', "w")
