"""The contract between the scheduler and the model runner: one forward pass over a ragged batch.

Each sequence keeps a token-level KV index (the cache slots it attends to, in order) and its own position ids,
so forked, merged or independently encoded sequences need no special cases here: a new token attends to every
entry of its sequence's index up to and including its own slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApeChunk:
    """APE cached contexts (engine/ape.py): the chunk's tokens also attend every context slot, non-causally and
    with temperature `temperature`, merged with the causal part by log-sum-exp (context part scaled by S·T)."""

    context_slots: list[int]  # the union of the contexts' own slots (not their copies of the shared prefix)
    num_prefix: int  # leading entries of kv_slots holding the shared prefix: those tokens never attend contexts
    temperature: float
    scale: float


@dataclass
class SeqChunk:
    """One sequence's part of a forward pass."""

    token_ids: list[int]  # the new tokens to run
    positions: list[int]  # their position ids (RoPE); need not equal their index in kv_slots
    kv_slots: list[int]  # the sequence's whole KV index after this step; the new tokens' slots are its tail
    need_logits: bool  # return logits for the last new token (a decode, or the prefill chunk that ends the prompt)
    ape: ApeChunk | None = None  # attend cached contexts too

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def num_cached(self) -> int:
        """KV entries written by earlier steps (or shared from a prefix / fork / merge)."""
        return len(self.kv_slots) - len(self.token_ids)
