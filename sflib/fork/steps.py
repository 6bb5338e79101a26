"""How long each step of a fork or of a clone's start took, for sfld's log."""

from __future__ import annotations

import time


class Steps:
    """Steps timed one after the other: done(step) ends one."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.took: list[tuple[str, float, str]] = []

    def done(self, step: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.took.append((step, (now - self.last) * 1000, detail))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {ms:.1f}" + (f" ({detail})" if detail else "")
                         for step, ms, detail in self.took) + " ms"  # fmt: skip
