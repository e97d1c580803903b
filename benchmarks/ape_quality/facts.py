"""A synthetic fact-retrieval set for APE's quality stand-in: documents with distinct facts and distractors, and
questions with exact answers.

Every item has `num_docs` short documents, one per fictional entity, each stating two numeric attributes of its
entity. The question asks for one attribute of one entity, so the other entities' values for the same attribute
(and the entity's other attribute) are the distractors. Values are 3-digit numbers, unique within an item; the
score is exact match of the first number in the answer. Built from a fixed seed, so the set is the same on every
machine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ENTITIES = ["Alba", "Brenna", "Corvin", "Dalia", "Edric", "Fenna", "Galen", "Hesper", "Ilsa", "Jorin", "Kestra",
            "Lucan", "Mirela", "Nestor", "Orla", "Pavel", "Quilla", "Rowan", "Sabine", "Tobin", "Ulla", "Varek",
            "Wren", "Yusuf"]
ATTRIBUTES = ["door code", "locker number", "room number", "badge number", "train number", "desk number"]
TEMPLATES = [
    "Notes about {e}. The {a1} of {e} is {v1}. The {a2} of {e} is {v2}.",
    "{e} keeps a small notebook. In it, the {a1} of {e} is written as {v1}, and the {a2} of {e} as {v2}.",
    "From the staff records: {e} has {a1} {v1}. {e} also has {a2} {v2}.",
]


@dataclass
class Item:
    documents: list[str]
    question: str
    answer: str


def build_set(num_items: int = 30, num_docs: int = 6, seed: int = 7) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(num_items):
        entities = rng.sample(ENTITIES, num_docs)
        values = iter(rng.sample(range(100, 1000), 2 * num_docs))
        docs, facts = [], []
        for e in entities:
            a1, a2 = rng.sample(ATTRIBUTES, 2)
            v1, v2 = next(values), next(values)
            docs.append(rng.choice(TEMPLATES).format(e=e, a1=a1, a2=a2, v1=v1, v2=v2))
            facts += [(e, a1, v1), (e, a2, v2)]
        e, a, v = rng.choice(facts)
        items.append(Item(docs, f"What is the {a} of {e}? Answer with the number only.", str(v)))
    return items


def exact_match(output: str, answer: str) -> bool:
    """The first number in the output is the answer."""
    found = re.search(r"\d+", output)
    return found is not None and found.group() == answer
