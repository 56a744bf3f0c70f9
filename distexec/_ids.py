"""Process ids and remote reference ids.

Layer: L0 leaf. Imports: stdlib.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

WorkerId = int

#: The master's pid, always.
MASTER: WorkerId = 1


@dataclass(frozen=True, slots=True, order=True)
class RRID:
    """A remote reference id: the process that made the reference and its serial number there.

    Julia: ``RRID(whence, id)``; ``RRID(0, 0)`` means "none".
    """

    whence: int
    id: int

    def __repr__(self) -> str:
        return f"RRID({self.whence}, {self.id})"


class Counter:
    """A thread-safe increasing counter (``next`` on ``itertools.count`` is atomic)."""

    __slots__ = ("_it",)

    def __init__(self, start: int = 1) -> None:
        self._it = itertools.count(start)

    def next(self) -> int:
        return next(self._it)
