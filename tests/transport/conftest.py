"""Fixtures for transport tests: the ``certs`` made once per session.

Layer: tests. Imports: pytest, tlscerts.
"""

from __future__ import annotations

import pytest
from tlscerts import Certs, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))
