"""How a set of characters may be written inside a JSON string literal.

Schema constraints (pattern, format, enum, property names) are about *decoded* characters, but the model
writes JSON text, where one character has several spellings: `é`, `\\u00e9`, `\\u00E9`. Every place
that puts characters inside a JSON string goes through `json_chars`, so escapes are handled once and
exactly: a spelling is allowed iff it decodes to a member of the set.

Two policies:
- `free`: every valid JSON spelling (raw, short escape, `\\uXXXX`, surrogate pairs). Used where the
  string is unconstrained, so any JSON a client could send is accepted.
- `canonical`: the spellings `json.dumps` produces with either `ensure_ascii` setting, hex digits in
  either case: printable ASCII raw; `"` and `\\` and the controls with a short form as short escapes;
  other controls, DEL and non-ASCII as `\\uXXXX` (non-ASCII also raw). Used for constrained text
  (patterns, formats, enum/const values, property names) so that, e.g., `\\u0061` for `a` or `\\/` for
  `/` does not multiply every literal into alternations.
Lone surrogates (`\\ud800` alone) are never accepted: they do not decode to a character.
"""

from __future__ import annotations

from functools import lru_cache

from .charset import ANY_CHAR, MAX_CODE_POINT, CharSet
from .digit_ranges import fixed_width_ranges
from .ebnf_writer import Expr, alt, chars, lit, seq

_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_CONTROLS = CharSet.of((0, 0x1F))
# Characters that may appear unescaped in a JSON string.
RAW_OK = ANY_CHAR - _CONTROLS - CharSet.of('"', "\\")
# Characters json.dumps spells as \\uXXXX in at least one ensure_ascii mode.
_CANONICAL_HEX = (_CONTROLS - CharSet.of(*"\b\f\n\r\t")) | CharSet.of((0x7F, MAX_CODE_POINT))


def _hex_digit_class(lo: int, hi: int) -> Expr:
    """Hex digits lo..hi (0-15), letters in either case."""
    spans: list[tuple[int, int]] = []
    if lo <= 9:
        spans.append((ord("0") + lo, ord("0") + min(hi, 9)))
    if hi >= 10:
        a, b = max(lo, 10) - 10, hi - 10
        spans += [(ord("a") + a, ord("a") + b), (ord("A") + a, ord("A") + b)]
    return chars(CharSet.from_ranges(spans))


def _hex4(lo: int, hi: int) -> Expr:
    """Four hex digits spelling a value in lo..hi."""
    return alt(*(seq(*(_hex_digit_class(a, b) for a, b in digits)) for digits in fixed_width_ranges(lo, hi, 4, 16)))


def _unicode_escapes(charset: CharSet) -> Expr:
    """`\\uXXXX` spellings (surrogate pairs above the BMP) of the characters in `charset`."""
    options: list[Expr] = []
    for lo, hi in charset.ranges:
        if lo <= 0xFFFF:
            options.append(seq(lit("\\u"), _hex4(lo, min(hi, 0xFFFF))))
        if hi < 0x10000:
            continue
        lo = max(lo, 0x10000)
        high_lo, low_lo = divmod(lo - 0x10000, 0x400)
        high_hi, low_hi = divmod(hi - 0x10000, 0x400)
        if high_lo == high_hi:
            pairs = [(high_lo, high_lo, low_lo, low_hi)]
        else:
            # A partial first and last high surrogate, and the full ones between them in one pattern.
            first = high_lo if low_lo == 0 else high_lo + 1
            last = high_hi if low_hi == 0x3FF else high_hi - 1
            pairs = [(first, last, 0, 0x3FF)]
            if low_lo != 0:
                pairs.insert(0, (high_lo, high_lo, low_lo, 0x3FF))
            if low_hi != 0x3FF:
                pairs.append((high_hi, high_hi, 0, low_hi))
        for h_lo, h_hi, l_lo, l_hi in pairs:
            if h_lo <= h_hi:
                options.append(
                    seq(
                        lit("\\u"),
                        _hex4(0xD800 + h_lo, 0xD800 + h_hi),
                        lit("\\u"),
                        _hex4(0xDC00 + l_lo, 0xDC00 + l_hi),
                    )
                )
    return alt(*options)


@lru_cache(maxsize=4096)
def json_chars(charset: CharSet, *, canonical: bool) -> Expr:
    """One character of `charset`, as it may be spelled inside a JSON string (memoized: the same
    classes recur across a schema, and every enum literal spells its characters through here)."""
    raw = charset & RAW_OK
    short = "".join(letter for c, letter in _SHORT_ESCAPES.items() if ord(c) in charset)
    if canonical:
        short = short.replace("/", "")
        hex_set = charset & _CANONICAL_HEX
    else:
        hex_set = charset
    options = [chars(raw)]
    if short:
        options.append(seq(lit("\\"), chars(CharSet.of(*short))))
    if hex_set:
        options.append(_unicode_escapes(hex_set))
    return alt(*options)


def json_literal(text: str) -> Expr:
    """The canonical spellings of a fixed string's characters (without the quotes)."""
    return seq(*(lit(c) if c in _PLAIN else json_chars(CharSet.of(c), canonical=True) for c in text))


# Characters whose only canonical spelling is themselves.
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}
