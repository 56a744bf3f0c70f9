"""Other executors, adapted to ``ProcessPoolExecutor``'s signature, to measure the suite against.

Layer: compat harness, never shipped. Imports: stdlib, loky.

Only spellings are adapted, never behaviour, so the numbers they give are the executor's own.
"""

from __future__ import annotations

from typing import Any

import loky


class LokyExecutor(loky.ProcessPoolExecutor):  # type: ignore[misc]
    """loky's ``ProcessPoolExecutor`` with its ``context=`` argument spelled ``mp_context=``.

    ``python -m compat.cpython.run_stdlib_suite --executor compat.cpython.adapters:LokyExecutor``
    """

    def __init__(self, *args: Any, mp_context: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, context=mp_context, **kwargs)
