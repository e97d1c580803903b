"""Sets of Unicode code points as sorted, merged, inclusive intervals.

Grammar front-ends reason about characters as sets (a regex class, "any JSON string character",
"every character except the next letter of a property name"); keeping them as interval tuples makes
union, intersection and complement exact and cheap, and gives one canonical form per set, which keeps
emitted rule bodies identical for identical inputs. Surrogates (U+D800..U+DFFF) are never members:
they are not characters and cannot appear in UTF-8 text.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)


@dataclass(frozen=True)
class CharSet:
    """An immutable set of code points; `ranges` is sorted, disjoint, non-adjacent, surrogate-free."""

    ranges: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def of(*items: int | str | tuple[int | str, int | str]) -> CharSet:
        """Build from code points, one-character strings and inclusive (lo, hi) pairs of either."""
        spans = []
        for item in items:
            if isinstance(item, tuple):
                lo, hi = (ord(x) if isinstance(x, str) else x for x in item)
            else:
                lo = hi = ord(item) if isinstance(item, str) else item
            spans.append((lo, hi))
        return CharSet.from_ranges(spans)

    @staticmethod
    def from_ranges(spans: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> CharSet:
        pieces: list[tuple[int, int]] = []
        for lo, hi in spans:
            if lo > hi:
                continue
            if hi < SURROGATES[0] or lo > SURROGATES[1]:
                pieces.append((lo, hi))
                continue
            # Cut out the surrogate block so every member is a real character.
            if lo < SURROGATES[0]:
                pieces.append((lo, SURROGATES[0] - 1))
            if hi > SURROGATES[1]:
                pieces.append((SURROGATES[1] + 1, hi))
        pieces.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in pieces:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return CharSet(tuple(merged))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __contains__(self, cp: int) -> bool:
        return any(lo <= cp <= hi for lo, hi in self.ranges)

    def __or__(self, other: CharSet) -> CharSet:
        return CharSet.from_ranges(self.ranges + other.ranges)

    def __and__(self, other: CharSet) -> CharSet:
        out = []
        i = j = 0
        a, b = self.ranges, other.ranges
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return CharSet(tuple(out))

    def __sub__(self, other: CharSet) -> CharSet:
        return self & other.complement()

    def complement(self) -> CharSet:
        out = []
        start = 0
        for lo, hi in self.ranges:
            if lo > start:
                out.append((start, lo - 1))
            start = hi + 1
        if start <= MAX_CODE_POINT:
            out.append((start, MAX_CODE_POINT))
        return CharSet.from_ranges(out)

    def single(self) -> int | None:
        """The only member, if there is exactly one."""
        if len(self.ranges) == 1 and self.ranges[0][0] == self.ranges[0][1]:
            return self.ranges[0][0]
        return None


ANY_CHAR = CharSet.from_ranges([(0, MAX_CODE_POINT)])
DIGITS = CharSet.of(("0", "9"))
