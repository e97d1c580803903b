"""Stop strings over streamed text, without ever showing a client part of a stop string.

Text arrives in arbitrary chunks (one detokenizer step each). The checker emits everything except the longest
tail that is still a proper prefix of some stop string; that tail is all a later match could start in, so each
`feed` only searches the held tail plus the new chunk.

Match rule: the stream stops at the stop string that *ends* first (the moment it is complete, as a streaming
server must decide); among matches ending at the same place, the one starting earliest (the longest) wins. The
output is the text before the match, plus the stop string itself with `include_stop_str_in_output`.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Add streamed text; return (text safe to emit now, the matched stop string or None)."""
        if not self.stop:
            return new_text, None
        buf = self._held + new_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string): the smallest is the match
        for s in self.stop:
            start = buf.find(s)
            if start >= 0:
                cand = (start + len(s), start, s)
                if best is None or cand < best:
                    best = cand
        if best is not None:
            end, start, s = best
            self._held = ""
            return buf[: end if self.include_stop_str_in_output else start], s
        hold = self._hold_length(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        """Release the held-back tail when the sequence ends for another reason (EOS, length, stop token)."""
        held, self._held = self._held, ""
        return held

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), self._max_hold), 0, -1):
            if buf[-n:] in self._prefixes:
                return n
        return 0
