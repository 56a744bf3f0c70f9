"""``python -m distexec`` and the ``distexec`` command; the work is in :mod:`distexec._cli`.

Layer: entry point. Imports: distexec._cli.
"""

from __future__ import annotations

import sys

from distexec._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
