"""Structural tags (xgrammar's `structural_tag` JSON format) lowered to one grammar built around TagDispatch.

`triggered_tags` is the tool-calling shape: free text until a trigger, then the tag whose begin string
starts with that trigger (begin rest, content grammar, end) must complete, then free text again; with
`stop_after_first` the grammar ends after one tag, with `at_least_one` the output must open with a tag.
Content formats are JSON schemas, EBNF, regexes, constant strings or free text (which may not contain the
enclosing tag's end). Sub-grammars are spliced in under unique prefixes; identical ones are spliced once.
The legacy `compile_structural_tag(tags, triggers)` call is converted to the same JSON.
"""

from __future__ import annotations

import json

from .ebnf import Alt, Grammar, Lit, Ref, Rep, Seq, TagDispatch, parse_ebnf
from .errors import GrammarError


def _item_to_dict(item) -> dict:
    if isinstance(item, dict):
        begin, schema, end = item.get("begin"), item.get("schema"), item.get("end")
    else:
        begin, end = getattr(item, "begin", None), getattr(item, "end", None)
        schema = getattr(item, "schema_", getattr(item, "schema", None))
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(begin, str) or not isinstance(end, str):
        raise GrammarError("each structural tag item needs string 'begin' and 'end'")
    return {"type": "tag", "begin": begin, "content": {"type": "json_schema", "json_schema": schema}, "end": end}


def structural_tag_args_to_json(args: tuple, kwargs: dict) -> str:
    """Normalizes `(structural_tag)` or legacy `(tags, triggers)` arguments to canonical JSON text."""
    if "tags" in kwargs or "triggers" in kwargs or len(args) == 2:
        tags = kwargs.get("tags", args[0] if args else None)
        triggers = kwargs.get("triggers", args[1] if len(args) > 1 else None)
        if not isinstance(tags, (list, tuple)) or not isinstance(triggers, (list, tuple)):
            raise TypeError("compile_structural_tag(tags, triggers) needs two lists")
        tag = {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": list(triggers), "tags": [_item_to_dict(t) for t in tags]}}
    elif len(args) + len(kwargs) == 1:
        tag = args[0] if args else kwargs.get("structural_tag")
        if hasattr(tag, "model_dump"):
            tag = tag.model_dump(mode="json", by_alias=True)
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except json.JSONDecodeError as e:
                raise GrammarError(f"structural tag is not valid JSON: {e}") from None
        if not isinstance(tag, dict):
            raise GrammarError("a structural tag must be a JSON object")
    else:
        raise TypeError("compile_structural_tag takes (structural_tag) or (tags, triggers)")
    return json.dumps(tag, sort_keys=True)


class _Lowering:
    def __init__(self):
        self.rules: dict[str, object] = {}
        self.spliced: dict[tuple, str] = {}

    def new_rule(self, expr, hint: str) -> str:
        k = len(self.rules)
        while f"st{k}_{hint}" in self.rules:
            k += 1
        name = f"st{k}_{hint}"
        self.rules[name] = expr
        return name

    def splice(self, kind: str, key: str, ebnf_fn) -> Ref:
        """Adds a sub-grammar's rules (once per distinct input); returns a reference to its root.

        A rule keeps its name when the grammar already has that name with an identical definition (after
        renaming references), so helpers shared by many tool schemas (whitespace, strings, numbers) exist
        once; a clashing name gets a fresh prefix. Names only ever move to fresh ones, so this settles.
        """
        hit = self.spliced.get((kind, key))
        if hit is None:
            g = parse_ebnf(ebnf_fn())
            prefix = f"g{len(self.spliced)}_"
            names = {n: n for n in g.rules}
            changed = True
            while changed:
                changed = False
                for n, expr in g.rules.items():
                    if names[n] == n and n in self.rules and self.rules[n] != _rename(expr, names):
                        names[n] = prefix + n
                        changed = True
            for n, expr in g.rules.items():
                if names[n] not in self.rules:
                    self.rules[names[n]] = _rename(expr, names)
            hit = self.spliced[(kind, key)] = names[g.root]
        return Ref(hit)

    def lower(self, f, end_excludes: tuple[bytes, ...] = ()):
        if not isinstance(f, dict) or "type" not in f:
            raise GrammarError(f"structural tag format must be an object with a 'type', got {f!r}")
        t = f["type"]
        if t == "const_string":
            return Lit(_str(f, "value").encode())
        if t == "json_schema":
            if f.get("style", "json") != "json":
                raise GrammarError(f"json_schema style {f['style']!r} is not supported (only 'json')")
            if f.get("any_order"):
                raise GrammarError("json_schema any_order is not supported")
            schema = f.get("json_schema")
            opts = {k: f[k] for k in ("max_whitespace_cnt",) if f.get(k) is not None}
            text = json.dumps(schema)

            def build():
                from .json_schema import json_schema_to_ebnf

                return json_schema_to_ebnf(text, **opts)

            return self.splice("json_schema", text + repr(sorted(opts.items())), build)
        if t == "grammar":
            g = _str(f, "grammar")
            return self.splice("grammar", g, lambda: g)
        if t == "regex":
            p = _str(f, "pattern")

            def build_regex():
                from .regex import regex_to_ebnf

                return regex_to_ebnf(p)

            return self.splice("regex", p, build_regex)
        if t == "any_text":
            if f.get("max_tokens") is not None or f.get("max_chars") is not None:
                raise GrammarError("any_text max_tokens/max_chars are not supported")
            excludes = tuple(x.encode() for x in f.get("excludes", [])) + end_excludes
            return Ref(self.new_rule(TagDispatch((), True, tuple(x for x in excludes if x)), "text"))
        if t in ("sequence", "or"):
            elems = f.get("elements")
            if not isinstance(elems, list) or not elems:
                raise GrammarError(f"{t} needs a non-empty 'elements' list")
            items = tuple(self.lower(e) for e in elems)
            return Seq(items) if t == "sequence" else Alt(items)
        if t in ("optional", "plus", "star", "repeat"):
            inner = self.lower(f.get("content"))
            if t == "repeat":
                lo, hi = f.get("min"), f.get("max")
                if not isinstance(lo, int) or not isinstance(hi, int) or not 0 <= lo <= hi:
                    raise GrammarError("repeat needs integer 0 <= min <= max")
                return Rep(inner, lo, hi)
            return Rep(inner, *{"optional": (0, 1), "plus": (1, None), "star": (0, None)}[t])
        if t == "tag":
            return self.tag(f)
        if t == "triggered_tags":
            return self.triggered_tags(f)
        if t == "tags_with_separator":
            tags = [self.tag(x) for x in _list(f, "tags")]
            choice = Alt(tuple(tags)) if len(tags) > 1 else tags[0]
            if f.get("stop_after_first"):
                return choice if f.get("at_least_one") else Rep(choice, 0, 1)
            sep = Lit(_str(f, "separator").encode())
            many = Seq((choice, Rep(Seq((sep, choice)), 0, None)))
            return many if f.get("at_least_one") else Rep(many, 0, 1)
        if t == "dispatch":
            pairs = []
            for pair in _list(f, "rules"):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
                    raise GrammarError("dispatch rules must be [trigger, format] pairs")
                pairs.append((pair[0].encode(), self.new_rule(self.lower(pair[1]), "dispatched")))
            excl = tuple(x.encode() for x in f.get("excludes", []))
            return Ref(self.new_rule(TagDispatch(tuple(pairs), bool(f.get("loop", True)), excl), "dispatch"))
        raise GrammarError(f"structural tag format type {t!r} is not supported")

    def tag(self, f) -> Seq:
        if not isinstance(f, dict) or f.get("type", "tag") != "tag":
            raise GrammarError("expected a tag format")
        begin = _str(f, "begin")
        ends = f.get("end")
        ends = [ends] if isinstance(ends, str) else ends
        if not isinstance(ends, list) or not ends or not all(isinstance(e, str) for e in ends):
            raise GrammarError("a tag's 'end' must be a string or a non-empty list of strings")
        content = self.lower(f.get("content"), tuple(e.encode() for e in ends if e))
        end = Alt(tuple(Lit(e.encode()) for e in ends)) if len(ends) > 1 else Lit(ends[0].encode())
        return Seq((Lit(begin.encode()), content, end))

    def triggered_tags(self, f) -> Ref:
        triggers = _list(f, "triggers")
        tags = _list(f, "tags")
        if not all(isinstance(t, str) and t for t in triggers):
            raise GrammarError("triggers must be non-empty strings")
        by_trigger: dict[str, list] = {t: [] for t in triggers}
        full = []
        for tag in tags:
            begin = _str(tag, "begin")
            owners = [t for t in triggers if begin.startswith(t)]
            if len(owners) != 1:
                raise GrammarError(f"tag begin {begin!r} must start with exactly one trigger, matches {len(owners)}")
            lowered = self.tag(tag)
            full.append(lowered)
            rest = Lit(begin[len(owners[0]):].encode())
            by_trigger[owners[0]].append(Seq((rest,) + lowered.items[1:]))
        any_tag = Alt(tuple(full)) if len(full) > 1 else full[0]
        at_least_one, stop_after_first = bool(f.get("at_least_one")), bool(f.get("stop_after_first"))
        if at_least_one and stop_after_first:
            return Ref(self.new_rule(any_tag, "tags"))
        pairs = tuple(
            (t.encode(), self.new_rule(Alt(tuple(alts)) if len(alts) > 1 else alts[0], "tag"))
            for t, alts in by_trigger.items() if alts
        )
        excl = tuple(x.encode() for x in f.get("excludes", []) if x)
        if not pairs:
            raise GrammarError("triggered_tags needs at least one tag")
        dispatch = Ref(self.new_rule(TagDispatch(pairs, not stop_after_first, excl), "dispatch"))
        if at_least_one:
            return Ref(self.new_rule(Seq((any_tag, dispatch)), "first"))
        return dispatch


def _str(f: dict, key: str) -> str:
    v = f.get(key) if isinstance(f, dict) else None
    if not isinstance(v, str):
        raise GrammarError(f"structural tag field {key!r} must be a string")
    return v


def _list(f: dict, key: str) -> list:
    v = f.get(key)
    if not isinstance(v, list) or not v:
        raise GrammarError(f"structural tag field {key!r} must be a non-empty list")
    return v


def _rename(e, names: dict[str, str]):
    if isinstance(e, Ref):
        return Ref(names[e.name])
    if isinstance(e, (Seq, Alt)):
        return type(e)(tuple(_rename(i, names) for i in e.items))
    if isinstance(e, Rep):
        return Rep(_rename(e.item, names), e.lo, e.hi)
    if isinstance(e, TagDispatch):
        return TagDispatch(tuple((t, names[r]) for t, r in e.pairs), e.loop, e.excludes)
    return e


def structural_tag_to_grammar(text: str) -> Grammar:
    """Lowers canonical structural-tag JSON (see structural_tag_args_to_json) to a grammar."""
    tag = json.loads(text)
    if tag.get("type", "structural_tag") != "structural_tag" or "format" not in tag:
        raise GrammarError("a structural tag needs type 'structural_tag' and a 'format'")
    low = _Lowering()
    root = low.new_rule(low.lower(tag["format"]), "root")
    return Grammar(low.rules, root, {})
