"""Numeric ranges as exact regular languages over digit strings.

JSON-schema `minimum`/`maximum` must be enforced while the number is being written, so a bound becomes
a grammar over its decimal digits (the classic range-to-regex construction), not a check afterwards.
The same fixed-width construction gives the hex digits of `\\uXXXX` escapes for a range of characters.

Languages produced here are canonical: integers have no leading zeros and no `-0`; bounded decimals are
written without an exponent (`12.5`, not `1.25e1`). That is a deliberate subset of JSON numbers: it is
what models write, and exponents would make exact bounds far more complex.
"""

from __future__ import annotations

from decimal import Decimal

from .charset import DIGITS, CharSet
from .ebnf_writer import EMPTY, NOTHING, Expr, alt, chars, lit, repeat, seq

DigitRanges = list[tuple[int, int]]


def fixed_width_ranges(lo: int, hi: int, width: int, base: int) -> list[DigitRanges]:
    """Digit-range sequences, each `width` long, that together spell exactly the numbers lo..hi."""
    if lo > hi:
        return []
    if width == 0:
        return [[]]
    place = base ** (width - 1)
    lo_head, lo_rest = divmod(lo, place)
    hi_head, hi_rest = divmod(hi, place)
    if lo_head == hi_head:
        return [[(lo_head, lo_head), *rest] for rest in fixed_width_ranges(lo_rest, hi_rest, width - 1, base)]
    out: list[DigitRanges] = []
    first, last = lo_head, hi_head
    if lo_rest != 0:
        out += [[(lo_head, lo_head), *rest] for rest in fixed_width_ranges(lo_rest, place - 1, width - 1, base)]
        first += 1
    tail: list[DigitRanges] = []
    if hi_rest != place - 1:
        tail = [[(hi_head, hi_head), *rest] for rest in fixed_width_ranges(0, hi_rest, width - 1, base)]
        last -= 1
    if first <= last:
        out.append([(first, last)] + [(0, base - 1)] * (width - 1))
    return out + tail


def _decimal_digits(ranges: DigitRanges) -> Expr:
    """Render decimal digit ranges, folding runs of any-digit into a counted repeat."""
    parts: list[Expr] = []
    run = 0
    for lo, hi in ranges:
        if (lo, hi) == (0, 9):
            run += 1
            continue
        if run:
            parts.append(repeat(chars(DIGITS), run, run))
            run = 0
        parts.append(chars(CharSet.of((ord("0") + lo, ord("0") + hi))))
    if run:
        parts.append(repeat(chars(DIGITS), run, run))
    return seq(*parts)


def _natural_range(lo: int, hi: int | None) -> Expr:
    """Non-negative integers lo..hi (hi None = unbounded) without leading zeros."""
    if hi is not None and lo > hi:
        return NOTHING
    options: list[Expr] = []
    low_width = len(str(lo))
    high_width = len(str(hi)) if hi is not None else low_width
    for width in range(low_width, high_width + 1):
        start = max(lo, 10 ** (width - 1) if width > 1 else 0)
        end = 10**width - 1 if hi is None else min(hi, 10**width - 1)
        options += [_decimal_digits(r) for r in fixed_width_ranges(start, end, width, 10)]
    if hi is None:
        # Every number with more digits than `lo` exceeds it.
        options.append(seq(chars(CharSet.of(("1", "9"))), repeat(chars(DIGITS), low_width, None)))
    return alt(*options)


def integer_range(lo: int | None, hi: int | None) -> Expr:
    """Canonical JSON integers n with lo <= n <= hi (None = unbounded on that side)."""
    if lo is not None and hi is not None and lo > hi:
        return NOTHING
    options: list[Expr] = []
    if lo is None or lo < 0:
        # Negative numbers, written as "-" and a magnitude in max(1, -hi)..-lo.
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        options.append(seq(lit("-"), _natural_range(mag_lo, mag_hi)))
    if hi is None or hi >= 0:
        options.insert(0, _natural_range(max(lo or 0, 0), hi))
    return alt(*options)


def _split_decimal(d: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros; "" = none) of a non-negative decimal."""
    _, digits, exponent = d.normalize().as_tuple()
    text = "".join(map(str, digits))
    if exponent >= 0:
        return int(text) * 10**exponent, ""
    point = len(text) + exponent
    if point <= 0:
        return 0, "0" * -point + text
    return int(text[:point]), text[point:]


# A fraction bound is the digit string after the point ("" = zero) or None = no bound on that side.
FractionBound = str | None


def _zero_ok(low: FractionBound, low_excl: bool, high: FractionBound, high_excl: bool) -> bool:
    """Whether fraction value 0 (no digits, or only zeros) lies within the bounds."""
    return (low is None or (low == "" and not low_excl)) and (high is None or high != "" or not high_excl)


def _fraction_any(low: FractionBound, low_excl: bool, high: FractionBound, high_excl: bool) -> Expr:
    """Digit strings, empty included, whose value 0.s lies within the bounds."""
    empty = [EMPTY] if _zero_ok(low, low_excl, high, high_excl) else []
    return alt(*empty, _fraction_nonempty(low, low_excl, high, high_excl))


def _fraction_nonempty(low: FractionBound, low_excl: bool, high: FractionBound, high_excl: bool) -> Expr:
    """Non-empty digit strings s with 0.low <(=) 0.s <(=) 0.high, one digit of the bounds at a time.

    Each recursive step consumes a digit of a bound or hits a base case, so the grammar is linear in the
    bounds' digits.
    """
    if low == "" and not low_excl:
        low = None
    if low is None and high is None:
        return repeat(chars(DIGITS), 1, None)
    if low is None and high == "":
        return NOTHING if high_excl else repeat(lit("0"), 1, None)
    if low == "" and high is None:
        return seq(repeat(lit("0"), 0, None), _digit(1, 9), repeat(chars(DIGITS), 0, None))
    low_head, low_rest = (int(low[0]), low[1:]) if low else (0, low)
    high_head, high_rest = (int(high[0]), high[1:]) if high else (9, None) if high is None else (0, "")
    groups: list[tuple[int, int, FractionBound, FractionBound]] = []
    for d in range(10):
        if low is not None and d < low_head or high is not None and d > high_head:
            continue
        next_low = low_rest if low is not None and d == low_head else None
        next_high = high_rest if high is not None and d == high_head else None
        if groups and groups[-1][1] == d - 1 and groups[-1][2:] == (next_low, next_high):
            groups[-1] = (groups[-1][0], d, next_low, next_high)
        else:
            groups.append((d, d, next_low, next_high))
    return alt(*(seq(_digit(a, b), _fraction_any(nl, low_excl, nh, high_excl)) for a, b, nl, nh in groups))


def _digit(lo: int, hi: int) -> Expr:
    return chars(CharSet.of((ord("0") + lo, ord("0") + hi)))


def _fraction_part(low: FractionBound, low_excl: bool, high: FractionBound, high_excl: bool) -> Expr:
    """An optional "." and fraction digits, the fraction value within the bounds."""
    empty = [EMPTY] if _zero_ok(low, low_excl, high, high_excl) else []
    return alt(*empty, seq(lit("."), _fraction_nonempty(low, low_excl, high, high_excl)))


def _magnitude(lo: Decimal, lo_excl: bool, hi: Decimal | None, hi_excl: bool) -> Expr:
    """Unsigned decimal numerals (no exponent) with value in the range; lo >= 0."""
    lo_int, lo_frac = _split_decimal(lo)
    if hi is None:
        return alt(
            seq(_natural_range(lo_int, lo_int), _fraction_part(lo_frac, lo_excl, None, False)),
            seq(_natural_range(lo_int + 1, None), _fraction_part(None, False, None, False)),
        )
    hi_int, hi_frac = _split_decimal(hi)
    if lo_int == hi_int:
        return seq(_natural_range(lo_int, lo_int), _fraction_part(lo_frac, lo_excl, hi_frac, hi_excl))
    return alt(
        seq(_natural_range(lo_int, lo_int), _fraction_part(lo_frac, lo_excl, None, False)),
        seq(_natural_range(lo_int + 1, hi_int - 1), _fraction_part(None, False, None, False)),
        seq(_natural_range(hi_int, hi_int), _fraction_part(None, False, hi_frac, hi_excl)),
    )


def decimal_range(lo: Decimal | None, lo_excl: bool, hi: Decimal | None, hi_excl: bool) -> Expr:
    """Decimal numerals (optional "-", digits, optional fraction; no exponent, no negative zero)
    with lo <(=) value <(=) hi; None = unbounded on that side."""
    if lo is not None and hi is not None and (lo > hi or lo == hi and (lo_excl or hi_excl)):
        return NOTHING
    options: list[Expr] = []
    if hi is None or hi > 0 or (hi == 0 and not hi_excl):
        low, low_excl = (lo, lo_excl) if lo is not None and lo >= 0 else (Decimal(0), False)
        options.append(_magnitude(low, low_excl, hi, hi_excl))
    if lo is None or lo < 0:
        # Negatives: "-" and a magnitude strictly above zero (so "-0" is never written).
        mag_lo, mag_lo_excl = (-hi, hi_excl) if hi is not None and hi < 0 else (Decimal(0), True)
        mag_hi = None if lo is None else -lo
        options.append(seq(lit("-"), _magnitude(mag_lo, mag_lo_excl, mag_hi, lo_excl)))
    return alt(*options)
