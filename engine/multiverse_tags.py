"""The control tags of a Multiverse-trained model (per model; see engine/multiverse.py), importable without torch
so the serve config can check them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MultiverseTags:
    """The control tags of a Multiverse-trained model, and the text the engine forces at a fork and a merge."""

    parallel: str = "<Parallel>"
    goal: str = "<Goal>"
    outline: str = "<Outline>"
    outline_end: str = "</Outline>"
    goal_end: str = "</Goal>"
    path: str = "<Path>"
    path_end: str = "</Path>"
    conclusion: str = "<Conclusion>"
    conclusion_end: str = "</Conclusion>"
    parallel_end: str = "</Parallel>"
    path_header: str = "\n<Path>\n{id}:"  # starts each path; {id} is its outline id (as Multiverse-Engine does)
    conclusion_header: str = "<Conclusion>\n"  # prefilled on top of the merged paths

    def __post_init__(self) -> None:
        if "{id}" not in self.path_header or self.path not in self.path_header:
            raise ValueError("path_header must contain the path tag and {id}")
        if self.conclusion not in self.conclusion_header:
            raise ValueError("conclusion_header must contain the conclusion tag")

    def header(self, path_id: str) -> str:
        return self.path_header.replace("{id}", path_id)

    @property
    def all(self) -> tuple[str, ...]:
        return (self.parallel, self.goal, self.outline, self.outline_end, self.goal_end, self.path, self.path_end,
                self.conclusion, self.conclusion_end, self.parallel_end)
