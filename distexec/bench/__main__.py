"""``python -m distexec.bench``: see ``distexec.bench``.

Layer: tooling. Imports: the bench's command line.
"""

from __future__ import annotations

import sys

from distexec.bench._cli import main

if __name__ == "__main__":
    sys.exit(main())
