"""Multiverse generation: the model itself decides where to fork parallel paths and where to merge them.

A sequence that writes `<Goal> ... <Outline> 1: ... </Outline> ... </Goal>` forks one path per outline entry.
Each path is its own sequence: it starts with a forced `<Path> i:` header, shares the prefix KV copy-on-write and
restarts its positions right after `</Goal>`, so it never sees its siblings and all of them sit at the same
positions, exactly the mask and position ids Multiverse was trained with (features brief, section A2). A path
that closes its `</Path>` waits for its siblings; when all are done, the parent's KV index becomes prefix + every
path (kv_cache.merge: no copy, no re-prefill), `<Conclusion>` is prefilled on top, and positions continue one past
the furthest path, so the conclusion attends to all paths. Blocks nest inside paths up to `max_depth`.

A trigger token's own KV is computed before its event fires: the sequence runs one more forward pass over it,
without sampling, so every path shares the `</Goal>` token and the merged index holds each `</Path>` token once.

Tags are matched on the streamed text, so they work as plain strings and as added special tokens alike (special
tags are then kept in the output text, since they are the document's structure).

End of a document: EOS, a stop token or a stop string in any path ends the whole request ("stop"), and
`max_total_tokens` ends it with "length". A path that reaches `max_tokens` (depth) stops; once its siblings are
done too, the block cannot be concluded and the request ends with "length".

KV pressure: the scheduler preempts paths like any sequence (a path re-forks from its parent and recomputes its
own tokens); sequences holding a merge are never victims. When nothing can be scheduled at all, the documents hold
the pool: the lowest-ranked document without merges is swapped out whole (tokens kept, KV dropped) and recomputed
exactly when its root runs again, path by path from its fork points; a document that cannot be swapped, or that
alone fills the pool, ends with "length", as a sequence that outgrows the pool would.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCacheManager
from .multiverse_tags import MultiverseTags
from .outputs import CompletionOutput, PathText
from .sampler import SeqSamplingState
from .scheduler import Scheduler
from .sequence import Request, SeqStatus, Sequence
from .stop_checker import StopChecker
from .tokenizer import Tokenizer

FORK, CLOSE, REFORK = "fork", "close", "refork"


class TagScanner:
    """Finds the structural tags in one sequence's streamed text: `</Goal>` (with the outline ids since the last
    `<Goal>`) and the `</Path>` that closes the path the sequence started in."""

    def __init__(self, tags: MultiverseTags):
        self._tags = tags
        self._find = re.compile("|".join(re.escape(t) for t in (tags.goal, tags.goal_end, tags.path, tags.path_end)))
        self._outline_id = re.compile(re.escape(tags.outline) + r"\s*([0-9]+(?:\.[0-9]+)*)\s*:")
        self._longest = max(len(tags.goal), len(tags.goal_end), len(tags.path), len(tags.path_end))
        self.text = ""
        self._goal_start = -1  # where the text of the open goal begins (-1: no goal open)
        self.open_paths = 0

    def feed(self, piece: str) -> list[tuple[str, list[str]]]:
        """Events completed by `piece`, in order: (FORK, outline ids) and (CLOSE, [])."""
        scanned = len(self.text)
        self.text += piece
        events: list[tuple[str, list[str]]] = []
        for m in self._find.finditer(self.text, max(0, scanned - self._longest + 1)):
            if m.end() <= scanned:
                continue
            tag = m.group()
            if tag == self._tags.goal:
                self._goal_start = m.end()
            elif tag == self._tags.goal_end:
                ids = self._outline_id.findall(self.text, self._goal_start, m.start()) if self._goal_start >= 0 else []
                events.append((FORK, list(dict.fromkeys(ids))))
                self._goal_start = -1
            elif tag == self._tags.path:
                self.open_paths += 1
            elif self.open_paths > 0:
                self.open_paths -= 1
                if self.open_paths == 0:
                    events.append((CLOSE, []))
        return events


# ---- the document ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Block:
    paths: list[PathNode] = field(default_factory=list)
    cursor: int = 0  # first path not yet wholly released


@dataclass(eq=False)
class PathNode:
    """One path's text (the root node is the whole completion): runs of text and the blocks forked inside it."""

    label: str
    parts: list[list[str] | Block] = field(default_factory=list)
    done: bool = False
    cursor: int = 0  # release position: parts[cursor], and within a text run, pieces[emitted:]
    emitted: int = 0

    def write(self, text: str) -> None:
        if not text:
            return
        if not self.parts or isinstance(self.parts[-1], Block):
            self.parts.append([])
        self.parts[-1].append(text)

    def release(self) -> tuple[list[str], bool]:
        """Text not released before that now has its place in document order fixed, and whether this node is
        released to its end. Amortized over a document, each piece is visited once."""
        out: list[str] = []
        while self.cursor < len(self.parts):
            part = self.parts[self.cursor]
            if isinstance(part, Block):
                while part.cursor < len(part.paths):
                    text, complete = part.paths[part.cursor].release()
                    out += text
                    if not complete:
                        return out, False
                    part.cursor += 1
            else:
                out += part[self.emitted :]
                self.emitted = len(part)
                if self.cursor == len(self.parts) - 1 and not self.done:
                    return out, False  # this run may still grow
                self.emitted = 0
            self.cursor += 1
        return out, self.done

    def serialize(self) -> str:
        return "".join("".join(p) if isinstance(p, list) else "".join(q.serialize() for q in p.paths)
                       for p in self.parts)

    def branches(self) -> list[PathText]:
        """Every path below this node, in document order, with its whole text."""
        out: list[PathText] = []
        for part in self.parts:
            if isinstance(part, Block):
                for node in part.paths:
                    out.append(PathText(node.label, node.serialize()))
                    out += node.branches()
        return out

    def close_all(self) -> None:
        self.done = True
        for part in self.parts:
            if isinstance(part, Block):
                for node in part.paths:
                    node.close_all()


@dataclass(eq=False)
class Document:
    """One choice's parallel generation: its text tree, its counters and the news since the last output."""

    root: Sequence
    node: PathNode
    num_tokens: int = 0  # tokens after the prompt, over every path, forced headers included
    depth: int = 0  # positions used after the prompt
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_paths: list[PathText] = field(default_factory=list)

    @property
    def params(self):
        return self.root.request.params.parallel


@dataclass(eq=False)
class PathState:
    """A sequence's place in its document (`Sequence.parallel`)."""

    doc: Document
    node: PathNode  # where this sequence's text goes
    scanner: TagScanner
    level: int = 0  # forked blocks this sequence is nested in
    pending: tuple[str, list[str]] | None = None  # event waiting for the trigger token's KV
    children: list[Sequence] = field(default_factory=list)  # the forked block's paths, while suspended
    done: str | None = None  # "path" or "length" once this path waits for its siblings


class Multiverse:
    """Forks, merges and document bookkeeping for parallel requests; the engine calls in at fixed points."""

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, tokenizer: Tokenizer, max_model_len: int,
                 tags: MultiverseTags | None = None):
        self.kv = kv
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.tags = tags or MultiverseTags()
        added = tokenizer.hf.get_added_vocab()
        self.special_tags = any(t in added for t in self.tags.all)
        self._documents: dict[int, Document] = {}  # live documents by their root's seq_id
        self._news: dict[int, Document] = {}
        self.num_forks = 0
        self.num_merges = 0
        self.num_branches = 0  # live path sequences
        self.num_swaps = 0  # documents swapped out whole to let others go on
        self.finished_tokens = 0
        self.finished_depth = 0

    # ---- engine hooks ----------------------------------------------------------------------------------------
    def start(self, seq: Sequence) -> None:
        """Make a new choice's sequence the root of a parallel document, if its request asks for one."""
        if not seq.request.params.parallel_enabled:
            return
        if self.special_tags:  # the tags are the document's structure: keep them in the text
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer.hf, seq.request.prompt_token_ids, False)
        doc = Document(seq, PathNode(""))
        seq.parallel = PathState(doc, doc.node, TagScanner(self.tags))
        # A prompt may open the goal itself (a prefilled `<Parallel><Goal>...`): the outline ids are read from it.
        seq.parallel.scanner.feed(self.tokenizer.decode(seq.request.prompt_token_ids, skip_special_tokens=False))
        self._documents[seq.seq_id] = doc

    def holds(self, seq: Sequence) -> bool:
        """The sequence's last token triggered a fork or closed its path: compute its KV, sample nothing."""
        return seq.parallel is not None and seq.parallel.pending is not None

    def on_token(self, seq: Sequence, token_id: int, piece: str, text: str, matched: str | None) -> None:
        """A token was appended to a parallel sequence: `piece` is its raw text, `text` what the stop checker let
        through, `seq.finish_reason` set if it was EOS, a stop token or completed a stop string."""
        state = seq.parallel
        doc = state.doc
        doc.num_tokens += 1
        doc.new_token_ids.append(token_id)
        position = seq.kv.next_position + seq.num_uncomputed - 1
        doc.depth = max(doc.depth, position + 1 - seq.num_prompt_tokens)
        self._write(seq, text)
        self._news[doc.root.seq_id] = doc
        if seq.finish_reason is not None:
            self._finish(doc, seq.finish_reason, seq.stop_reason, stopped=seq if matched is not None else None)
            return
        limit = doc.params.max_total_tokens
        if limit is not None and doc.num_tokens >= limit:
            self._finish(doc, "length")
            return
        if position + 1 - seq.num_prompt_tokens >= seq.request.max_tokens or position + 1 >= self.max_model_len:
            self._close(seq, "length")
            return
        for kind, ids in state.scanner.feed(piece):
            if kind == FORK and self._may_fork(seq, ids, position):
                state.pending = (FORK, ids)
                return
            if kind == CLOSE and state.node is not doc.node:
                state.pending = (CLOSE, [])
                return

    def on_computed(self, seq: Sequence) -> None:
        """The sequence's tokens all have KV now: fire its pending fork or path end."""
        state = seq.parallel
        if state is None or state.pending is None or seq.num_uncomputed or seq.finished:
            return
        (kind, ids), state.pending = state.pending, None
        if kind == FORK:
            self._fork(seq, ids)
        elif kind == CLOSE:
            self._close(seq, "path")
        else:
            self._refork(seq)

    def drop(self, root: Sequence) -> None:
        """The request was aborted: release every path of the root's document (the engine removes the root)."""
        doc = self._documents.pop(root.seq_id, None)
        if doc is None:
            return
        self._news.pop(root.seq_id, None)
        for seq in self._descendants(root):
            self._remove(seq)

    def relieve(self) -> None:
        """Nothing could be scheduled: parallel documents hold the KV pool and none can go on. Swap out the
        lowest-ranked one that has no merge and shares the pool with others; else end the lowest-ranked document
        holding KV with "length"."""
        docs = sorted(self._documents.values(), key=lambda d: d.root.sort_key, reverse=True)  # lowest first
        held = [(doc, self._pages(doc)) for doc in docs]
        held = [(doc, pages) for doc, pages in held if pages]
        for doc, pages in held:
            if doc.root.parallel.children and len(pages) < self.kv.num_used_pages and self._swappable(doc.root):
                self._swap_out(doc.root)
                self.num_swaps += 1
                return
        if held:
            self._finish(held[0][0], "length")

    def take_outputs(self) -> list[tuple[Request, CompletionOutput]]:
        """One delta per document with news since the last call."""
        outs = []
        for doc in self._news.values():
            text, _ = doc.node.release()
            finished = doc.finish_reason is not None
            outs.append((doc.root.request, CompletionOutput(
                index=doc.root.index,
                text="".join(text),
                token_ids=doc.new_token_ids,
                finish_reason=doc.finish_reason,
                stop_reason=doc.stop_reason,
                num_generated_tokens=doc.num_tokens,
                depth=doc.depth,
                paths=doc.new_paths,
                branches=doc.node.branches() if finished else None,
            )))
            doc.new_token_ids, doc.new_paths = [], []
        self._news.clear()
        return outs

    # ---- fork and merge --------------------------------------------------------------------------------------
    def _may_fork(self, seq: Sequence, ids: list[str], position: int) -> bool:
        """Fork only what the budget can carry; otherwise the sequence just writes its paths one by one."""
        state = seq.parallel
        params = state.doc.params
        if not ids or len(ids) > params.max_paths or state.level >= params.max_depth:
            return False
        depth_left = seq.request.max_tokens - (position + 1 - seq.num_prompt_tokens)
        if min(depth_left, self.max_model_len - position - 1) < params.min_fork_budget:
            return False
        total = params.max_total_tokens
        return total is None or total - state.doc.num_tokens >= len(ids) * params.min_fork_budget

    def _fork(self, parent: Sequence, ids: list[str]) -> None:
        state = parent.parallel
        doc = state.doc
        self._flush(parent)  # text held back so far belongs before the block
        self.scheduler.suspend(parent)
        block = Block()
        state.node.parts.append(block)
        req = parent.request
        for pid in ids:
            header = self.tags.header(pid)
            header_ids = self.tokenizer.encode(header, add_special_tokens=False)
            node = PathNode(f"{state.node.label}/{pid}" if state.node.label else pid)
            block.paths.append(node)
            child = Sequence(req, parent.index, parent.token_ids + header_ids, kv=self.kv.fork(parent.kv),
                             num_computed=len(parent.token_ids), fork_base=parent)
            seed = parent.sampling.seed  # each path draws its own stream, reproducibly under a request seed
            if seed is not None:
                seed = (seed + zlib.crc32(node.label.encode())) % 2**63
            child.sampling = SeqSamplingState(req.params, req.prompt_token_ids, seed)
            for tok in child.token_ids[len(req.prompt_token_ids) :]:
                child.sampling.append(tok)
            child.detokenizer = IncrementalDetokenizer(
                self.tokenizer.hf, child.token_ids, req.params.skip_special_tokens and not self.special_tags
            )
            child.stop_checker = StopChecker(req.params.stop, req.params.include_stop_str_in_output)
            child.parallel = PathState(doc, node, TagScanner(self.tags), level=state.level + 1)
            child.parallel.scanner.feed(header)
            self._write(child, header)
            doc.num_tokens += len(header_ids)
            doc.new_token_ids += header_ids
            state.children.append(child)
            self.scheduler.add_running(child)
        self.num_forks += 1
        self.num_branches += len(ids)

    def _close(self, seq: Sequence, reason: str) -> None:
        """The sequence's path is done ("path") or out of depth ("length"); merge once all its siblings are."""
        state = seq.parallel
        if seq.fork_base is None:  # the root ran out of depth
            self._finish(state.doc, reason)
            return
        self._flush(seq)
        state.done = reason
        state.node.done = True
        if seq.status is SeqStatus.RUNNING:
            self.scheduler.suspend(seq)
        parent = seq.fork_base
        siblings = parent.parallel.children
        if all(s.parallel.done for s in siblings):
            if all(s.parallel.done == "path" for s in siblings):
                self._merge(parent)
            else:
                self._close(parent, "length")

    def _merge(self, parent: Sequence) -> None:
        """The parent's KV index becomes its prefix + every path; the conclusion header is prefilled on top."""
        state = parent.parallel
        children, state.children = state.children, []
        start = len(parent.token_ids)
        merged = self.kv.merge([c.kv for c in children], shared_prefix_len=len(parent.kv))
        tail = [tok for c in children for tok in c.token_ids[start:]]
        for child in children:
            self._remove(child)
        self.kv.free(parent.kv)
        parent.kv = merged
        parent.num_computed = len(merged)
        header = self.tags.conclusion_header
        header_ids = self.tokenizer.encode(header, add_special_tokens=False)
        parent.token_ids += tail + header_ids
        for tok in tail + header_ids:
            parent.sampling.append(tok)
        parent.detokenizer = IncrementalDetokenizer(
            self.tokenizer.hf, parent.token_ids,
            parent.request.params.skip_special_tokens and not self.special_tags,
        )
        parent.recomputable = False
        state.scanner.feed(header)
        self._write(parent, header)
        state.doc.num_tokens += len(header_ids)
        state.doc.new_token_ids += header_ids
        self.scheduler.add_running(parent)
        self.num_merges += 1

    # ---- swapping --------------------------------------------------------------------------------------------
    def _swappable(self, seq: Sequence) -> bool:
        return seq.recomputable and all(self._swappable(c) for c in seq.parallel.children)

    def _pages(self, doc: Document) -> set[int]:
        return {page for seq in [doc.root, *self._descendants(doc.root)] for page in seq.kv.pages}

    def _swap_out(self, root: Sequence) -> None:
        """Drop the document's KV, keep its tokens: the root waits to be recomputed, and each sequence with paths
        re-forks them when its own recompute is done (`_refork`), down to the live paths and finished ones."""
        for seq in self._descendants(root):
            self.scheduler.release(seq)
            state = seq.parallel
            if state.children:
                state.pending = (REFORK, [])
            elif state.done == "path":  # recomputed, it closes again, and the last one to close merges
                state.done, state.pending = None, (CLOSE, [])
        self.scheduler.release(root)
        root.parallel.pending = (REFORK, [])
        self.scheduler.add(root)

    def _refork(self, parent: Sequence) -> None:
        self.scheduler.suspend(parent)
        for child in parent.parallel.children:
            if child.parallel.done is None:  # a path that ran out of depth needs no KV: it is never merged
                child.kv = self.kv.fork(parent.kv)
                child.num_computed = len(parent.kv)
                self.scheduler.add(child)

    # ---- ending ----------------------------------------------------------------------------------------------
    def _finish(self, doc: Document, reason: str, stop_reason: str | int | None = None,
                stopped: Sequence | None = None) -> None:
        """End the whole document: every live path stops, its held-back text is released, its KV freed."""
        root = doc.root
        for seq in [root, *self._descendants(root)]:
            if seq is not stopped and seq.parallel.done is None:
                self._flush(seq)
            if seq is root:
                self.scheduler.remove(seq)
            else:
                self._remove(seq)
        doc.node.close_all()
        doc.finish_reason = root.finish_reason = reason
        doc.stop_reason = root.stop_reason = stop_reason
        self._documents.pop(root.seq_id, None)
        self._news[root.seq_id] = doc
        self.finished_tokens += doc.num_tokens
        self.finished_depth += doc.depth

    def _descendants(self, seq: Sequence) -> list[Sequence]:
        out = []
        for child in seq.parallel.children:
            out.append(child)
            out += self._descendants(child)
        return out

    def _remove(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.num_branches -= 1

    def _flush(self, seq: Sequence) -> None:
        """Release the text the detokenizer and the stop checker still hold for this sequence."""
        tail, matched = seq.stop_checker.feed(seq.detokenizer.flush())
        self._write(seq, tail if matched else tail + seq.stop_checker.flush())

    def _write(self, seq: Sequence, text: str) -> None:
        if not text:
            return
        state = seq.parallel
        state.node.write(text)
        if state.node is not state.doc.node:
            state.doc.new_paths.append(PathText(state.node.label, text))
        self._news[state.doc.root.seq_id] = state.doc
