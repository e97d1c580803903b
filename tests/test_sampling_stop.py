"""Streaming stop-string checks equal a plain one-shot cut, for any chunking, and never show a partial stop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle.engine.stop_checker import StopChecker

ALPHABET = "ab c🎉"
TEXTS = st.text(alphabet=ALPHABET, max_size=40)
STOPS = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


def one_shot(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The match that completes first (ties: the one starting first); cut before it, or after it with `include`."""
    found = [(text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    first_end = min(i + len(s) for i, s in found)
    start, stop = min((i, s) for i, s in found if i + len(s) == first_end)
    return text[: first_end if include else start], stop


def longest_held_suffix(text: str, stops: list[str]) -> int:
    return max((n for n in range(1, len(text) + 1) for s in stops if len(s) > n and s.startswith(text[-n:])),
               default=0)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, stops=STOPS, cuts=st.lists(st.integers(0, 40), max_size=15), include=st.booleans())
def test_streaming_equals_one_shot_for_any_chunking(text, stops, cuts, include):
    checker = StopChecker(stops, include)
    shown, matched, fed = "", None, ""
    for piece in chunked(text, cuts):
        fed += piece
        out, matched = checker.feed(piece)
        shown += out
        if matched is not None:
            break
        # Only a tail that could still start a stop string is held back, and nothing else.
        assert fed.startswith(shown)
        assert len(fed) - len(shown) == longest_held_suffix(fed, stops)
    if matched is None:
        shown += checker.flush()
    assert (shown, matched) == one_shot(text, stops, include)


def test_partial_stop_is_held_then_released_or_cut():
    checker = StopChecker(["</answer>"], include_stop_str_in_output=False)
    assert checker.feed("42</ans") == ("42", None)
    assert checker.feed("wer> trailing") == ("", "</answer>")
    checker = StopChecker(["</answer>"], include_stop_str_in_output=False)
    assert checker.feed("a </an") == ("a ", None)
    assert checker.feed("d") == ("</and", None)  # the held text turned out not to be a stop string
    assert checker.feed(" </") == (" ", None)
    assert checker.flush() == "</"


def test_earliest_completed_stop_wins_and_can_be_included():
    assert StopChecker(["abc", "b"], False).feed("xabc") == ("xa", "b")
    assert StopChecker(["abc", "bc"], True).feed("xabcd") == ("xabc", "abc")


def test_no_stop_strings_pass_text_through():
    checker = StopChecker([], include_stop_str_in_output=False)
    assert checker.feed("anything") == ("anything", None)
    assert checker.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""], include_stop_str_in_output=False)
