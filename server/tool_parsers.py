"""Tool-call formats of the common model families: how calls look in model output, the structural tag that
constrains them, and an incremental parser that turns output text into content and tool-call deltas.

  hermes       (Hermes, Qwen 2/2.5/3, and treadle's injected prompt)
               <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>      one block per call
  llama3_json  (Llama 3.1/3.2)   [<|python_tag|>]{"name": "f", "parameters": {...}}; {...}
  mistral      (Mistral)         [TOOL_CALLS][{"name": "f", "arguments": {...}}, {...}]

The parser is the only place tool calls are recognised: a non-streaming answer is the same parser fed the whole
text, so the reassembled stream equals it byte for byte. `arguments` are the model's raw JSON text (no
re-serialisation), streamed as they are generated; a call's id, type and name go out first, as OpenAI does.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import ClassVar

_ALNUM = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    """The first delta of a call carries id and name (and empty arguments); later ones argument fragments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


Delta = ContentDelta | ToolCallDelta


# ---- formats ------------------------------------------------------------------------------------------------------
class ToolCallFormat:
    """One family's output format. `tools` below are OpenAI function definitions ({"name", "parameters", ...})."""

    name: ClassVar[str]
    triggers: ClassVar[tuple[str, ...]]  # strings in free text that open a block of calls
    object_triggers: ClassVar[tuple[str, ...]] = ()  # triggers that are the start of the call object itself
    block_open: ClassVar[str] = ""  # after the trigger, before the first call
    between: ClassVar[str] = ""  # between calls of one block ("" = one call per block)
    block_close: ClassVar[str] = ""  # after the last call of a block
    call_prefix: ClassVar[str] = ""  # in constrained output: before each call object ...
    call_suffix: ClassVar[str] = ""  # ... and after it
    separator: ClassVar[str]  # between calls in constrained output
    arguments_keys: ClassVar[tuple[str, ...]] = ("arguments",)  # the first is the one the model is told to use
    example: ClassVar[str]  # how to call, for the injected system prompt

    def call_tag(self, tool: dict) -> dict:
        """A structural-tag `tag` for one call of `tool`: the wrapper is fixed, the arguments follow its schema."""
        return {
            "type": "tag",
            "begin": self.call_prefix + '{"name": ' + json.dumps(tool["name"]) + f', "{self.arguments_keys[0]}": ',
            "content": {"type": "json_schema", "json_schema": tool_parameters(tool)},
            "end": "}" + self.call_suffix,
        }

    def calls(self, tools: list[dict], parallel: bool) -> dict:
        """A structural-tag format for one call (several if `parallel`) of the given tools, and nothing else."""
        return {"type": "tags_with_separator", "tags": [self.call_tag(t) for t in tools],
                "separator": self.separator, "at_least_one": True, "stop_after_first": not parallel}

    def text_or_calls(self, tools: list[dict], parallel: bool) -> dict:
        """Free text in which calls may appear; each trigger forces a complete, valid call."""
        return {"type": "triggered_tags", "triggers": list(self.triggers), "tags": [self.call_tag(t) for t in tools],
                "stop_after_first": not parallel}

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """(name, arguments JSON) pairs as the model writes them, for calls in the conversation history."""
        key = self.arguments_keys[0]
        objs = [self.call_prefix + '{"name": ' + json.dumps(name) + f', "{key}": {args}}}' + self.call_suffix
                for name, args in calls]
        return self.separator.join(objs)

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self)


class HermesFormat(ToolCallFormat):
    name = "hermes"
    triggers = ("<tool_call>",)
    block_close = "</tool_call>"
    call_prefix = "<tool_call>\n"
    call_suffix = "\n</tool_call>"
    separator = "\n"
    example = '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'


class Llama3JsonFormat(ToolCallFormat):
    name = "llama3_json"
    triggers = ("<|python_tag|>", '{"name"')
    object_triggers = ('{"name"',)
    between = ";"
    separator = "; "
    arguments_keys = ("parameters", "arguments")
    example = '{"name": <function name>, "parameters": <arguments as a JSON object>}'

    def text_or_calls(self, tools: list[dict], parallel: bool) -> dict:
        # <|python_tag|> is a special token, which grammar text never produces: calls open with '{"name": '.
        return {"type": "triggered_tags", "triggers": ['{"name": '], "tags": [self.call_tag(t) for t in tools],
                "stop_after_first": not parallel}


class MistralFormat(ToolCallFormat):
    """Mistral's JSON-list format. `[TOOL_CALLS]` is a special token in Mistral tokenizers: the server keeps
    special tokens in the text while this format is active, and grammars spell the trigger as plain text."""

    name = "mistral"
    triggers = ("[TOOL_CALLS]",)
    block_open = "["
    between = ","
    block_close = "]"
    separator = ", "
    example = '[TOOL_CALLS][{"name": <function name>, "arguments": <arguments as a JSON object>}]'

    def calls(self, tools: list[dict], parallel: bool) -> dict:
        return {"type": "tag", "begin": "[TOOL_CALLS][", "content": super().calls(tools, parallel), "end": "]"}

    def text_or_calls(self, tools: list[dict], parallel: bool) -> dict:
        return {"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"], "tags": [self.calls(tools, parallel)],
                "stop_after_first": True}

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        return "[TOOL_CALLS][" + super().render_calls(calls) + "]"


FORMATS: dict[str, type[ToolCallFormat]] = {f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat)}


def tool_parameters(tool: dict) -> dict:
    """The arguments schema of a function; OpenAI allows omitting it for functions without parameters."""
    params = tool.get("parameters")
    return params if params is not None else {"type": "object", "properties": {}}


# ---- the incremental parser -----------------------------------------------------------------------------------------
_WS = " \t\r\n"

# Where the parser is: free text, after a trigger, before / inside / after a call object.
_TEXT, _OPEN, _OBJECT, _IN_OBJECT, _AFTER = range(5)
# Inside a call object, at its top level.
_KEY_OR_END, _KEY, _COLON, _VALUE_START, _VALUE, _AFTER_VALUE = range(6)


class ToolCallParser:
    """Splits one choice's output into content and tool-call deltas as text arrives.

    A block opens with a trigger and holds one or more call objects, with the format's separator between them
    and its closer after them. A trigger that is not followed by a well-formed call is content, as long as
    nothing of its block was sent. Whitespace around calls is formatting, not content. Each call is sent as soon
    as its name is complete, then its arguments as they grow; a call cut off by the end of the output keeps
    what was sent of it.
    """

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.num_calls = 0
        self._buf = ""
        self._pos = 0  # text before it is dealt with
        self._state = _TEXT
        self._trigger_end = 0  # end of the current block's trigger
        self._block_sent = False  # a call of the current block was sent
        self._call_end = 0  # end of the last complete call object
        self._ws_before_block = ""  # whitespace held when the block's trigger came, restored if it is no call
        self._held_ws = ""  # trailing whitespace of content: sent only if more content follows
        self._after_call = False  # drop whitespace that follows a block
        self._start_object(0)

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        self._advance(out, final=False)
        return _merge(out)

    def finish(self) -> list[Delta]:
        """The output ended: everything held back is resolved."""
        out: list[Delta] = []
        self._advance(out, final=True)
        if self._held_ws and not self.num_calls:
            out.append(ContentDelta(self._held_ws))
        self._held_ws = ""
        return _merge(out)

    # ---- framing ---------------------------------------------------------------------------------------------
    def _advance(self, out: list[Delta], final: bool) -> None:
        fmt = self.fmt
        while True:
            state = self._state
            if state == _TEXT:
                if not self._scan_text(out, final):
                    return
            elif state == _OPEN:
                i = self._skip_ws(self._pos)
                rest = self._buf[i:]
                if rest.startswith(fmt.block_open):
                    self._pos, self._state = i + len(fmt.block_open), _OBJECT
                elif final or not fmt.block_open.startswith(rest):
                    self._malformed(out)
                else:
                    return
            elif state == _OBJECT:
                i = self._skip_ws(self._pos)
                if i < len(self._buf) and self._buf[i] == "{":
                    self._start_object(i)
                    self._pos, self._state = i + 1, _IN_OBJECT
                elif final or i < len(self._buf):
                    self._malformed(out)
                else:
                    return
            elif state == _IN_OBJECT:
                if not self._scan_object(out):
                    if not final:
                        return
                    if self._header_sent:  # cut off mid-call: the call stays as far as it got
                        self._end_block(len(self._buf))
                    else:
                        self._malformed(out)
            else:  # _AFTER
                i = self._skip_ws(self._pos)
                rest = self._buf[i:]
                if fmt.between and rest.startswith(fmt.between):
                    self._pos, self._state = i + len(fmt.between), _OBJECT
                elif fmt.block_close and rest.startswith(fmt.block_close):
                    self._end_block(i + len(fmt.block_close))
                elif not final and (fmt.between.startswith(rest) or fmt.block_close.startswith(rest)):
                    return  # may still become the separator or the closer
                else:
                    self._end_block(i)

    def _scan_text(self, out: list[Delta], final: bool) -> bool:
        """Content up to the next trigger (True), or as far as it is surely content (False)."""
        buf, start = self._buf, self._pos
        hits = [(i, t) for t in self.fmt.triggers if (i := buf.find(t, start)) >= 0]
        if hits:
            i, trigger = min(hits)
            self._content(out, buf[start:i])
            self._ws_before_block, self._held_ws = self._held_ws, ""  # whitespace before a call is formatting
            self._block_sent = False
            if trigger in self.fmt.object_triggers:  # the trigger is the start of the call object itself
                self._trigger_end, self._pos, self._state = i + len(trigger), i, _OBJECT
            else:
                self._trigger_end = self._pos = i + len(trigger)
                self._state = _OPEN
            return True
        keep = 0 if final else max(
            (k for t in self.fmt.triggers for k in range(1, len(t)) if buf.endswith(t[:k])), default=0)
        cut = max(start, len(buf) - keep)
        self._content(out, buf[start:cut])
        self._pos = cut
        return False

    def _malformed(self, out: list[Delta]) -> None:
        """Not a call after all: if nothing of the block was sent its trigger is content, else the block ends."""
        if self._block_sent:  # resume after the last complete call, or where a call that was sent broke off
            self._end_block(self._pos if self._state == _IN_OBJECT and self._header_sent else self._call_end)
        else:
            start = self._trigger_end - len(next(t for t in self.fmt.triggers
                                                 if self._buf.startswith(t, self._trigger_end - len(t))))
            self._held_ws = self._ws_before_block
            self._content(out, self._buf[start:self._trigger_end])
            self._pos, self._state = self._trigger_end, _TEXT

    def _end_block(self, pos: int) -> None:
        self._pos, self._state = pos, _TEXT
        self._after_call = True

    def _content(self, out: list[Delta], text: str) -> None:
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
        text = self._held_ws + text
        body = text.rstrip(_WS)
        self._held_ws = text[len(body):]
        if body:
            out.append(ContentDelta(body))

    def _skip_ws(self, i: int) -> int:
        buf = self._buf
        while i < len(buf) and buf[i] in _WS:
            i += 1
        return i

    # ---- one call object -------------------------------------------------------------------------------------
    def _start_object(self, start: int) -> None:
        self._obj_start = start
        self._obj_state = _KEY_OR_END
        self._key: str | None = None
        self._key_start = 0
        self._value_start = 0
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._name: str | None = None
        self._args_start: int | None = None
        self._args_end: int | None = None
        self._args_sent = 0
        self._header_sent = False

    def _scan_object(self, out: list[Delta]) -> bool:
        """Scan the call object from the current position; True once it is complete (or malformed)."""
        buf, i, n = self._buf, self._pos, len(self._buf)
        st = self._obj_state
        done = False
        while i < n and not done:
            ch = buf[i]
            if st == _VALUE or st == _KEY:
                if self._in_string:
                    if self._escape:
                        self._escape = False
                    elif ch == "\\":
                        self._escape = True
                    elif ch == '"':
                        self._in_string = False
                        if st == _KEY:
                            self._key = json.loads(buf[self._key_start:i + 1])
                            st = _COLON
                        elif self._depth == 0:
                            st = self._value_end(out, i + 1)
                    i += 1
                    continue
                if ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]" or (self._depth == 0 and (ch == "," or ch in _WS)):
                    if self._depth == 0:  # a scalar ends before its delimiter
                        st = self._value_end(out, i)
                        continue
                    self._depth -= 1
                    if self._depth == 0:
                        st = self._value_end(out, i + 1)
                i += 1
            elif ch in _WS:
                i += 1
            elif st == _KEY_OR_END and ch == '"':
                self._key_start, self._in_string, st = i, True, _KEY
                i += 1
            elif st == _COLON and ch == ":":
                st = _VALUE_START
                i += 1
            elif st == _VALUE_START:
                self._value_start, self._depth, st = i, 0, _VALUE
                if self._key in self.fmt.arguments_keys and self._args_start is None:
                    self._args_start = self._args_sent = i
            elif st == _AFTER_VALUE and ch == ",":
                st = _KEY_OR_END
                i += 1
            elif st in (_AFTER_VALUE, _KEY_OR_END) and ch == "}":
                done = True
                i += 1
            else:
                st = -1  # malformed
                break
        self._obj_state = st
        self._pos = i
        if st == -1 or (done and self._name is None):
            self._malformed(out)
            return True
        self._send_args(out, i)
        if not done:
            return False
        if self._args_start is None:
            out.append(ToolCallDelta(self.num_calls - 1, "{}"))
        self._call_end = i
        self._state = _AFTER
        return True

    def _value_end(self, out: list[Delta], end: int) -> int:
        raw = self._buf[self._value_start:end]
        if self._key == "name" and self._name is None:
            name = json.loads(raw) if raw.startswith('"') else None
            if not isinstance(name, str):
                return -1
            self._name = name
            out.append(ToolCallDelta(self.num_calls, "", id=new_tool_call_id(), name=name))
            self.num_calls += 1
            self._header_sent = self._block_sent = True
        elif self._args_start == self._value_start:
            self._args_end = end
        return _AFTER_VALUE

    def _send_args(self, out: list[Delta], upto: int) -> None:
        if not self._header_sent or self._args_start is None:
            return
        end = upto if self._args_end is None else min(upto, self._args_end)
        if end > self._args_sent:
            out.append(ToolCallDelta(self.num_calls - 1, self._buf[self._args_sent:end]))
            self._args_sent = end


def _merge(deltas: list[Delta]) -> list[Delta]:
    """Adjacent content pieces, and adjacent argument fragments of one call, become one delta."""
    merged: list[Delta] = []
    for d in deltas:
        last = merged[-1] if merged else None
        if isinstance(d, ContentDelta) and isinstance(last, ContentDelta):
            last.text += d.text
        elif (isinstance(d, ToolCallDelta) and isinstance(last, ToolCallDelta) and d.id is None
              and last.id is None and d.index == last.index):
            last.arguments += d.arguments
        else:
            merged.append(d)
    return merged
