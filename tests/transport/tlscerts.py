"""Certificates for TLS tests, made with trustme (a CA, good, expired and foreign ones).

Layer: tests. Imports: stdlib, trustme, distexec.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme

import distexec as dx


@dataclass(frozen=True)
class Certs:
    """PEM files: ``ca`` signs ``node`` (for 127.0.0.1 and localhost), ``expired`` and
    ``othername`` (for ``other.example`` only); ``foreign_ca`` signs ``foreign``."""

    dir: Path
    ca: Path
    node: Path
    expired: Path
    othername: Path
    foreign_ca: Path
    foreign: Path

    def config(self, **kw: object) -> dx.TLSConfig:
        """A TLSConfig using the cluster CA and the node certificate, changed by *kw*."""
        args: dict[str, object] = {"ca": self.ca, "cert": self.node, **kw}
        return dx.TLSConfig(**args)  # type: ignore[arg-type]


def make_certs(d: Path, *names: str) -> Certs:
    """Write the PEM files into *d*; ``node`` is also valid for every IP address in *names*."""
    ca, foreign_ca = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, blob: trustme.Blob) -> Path:
        path = d / name
        blob.write_to_path(str(path))
        path.chmod(0o600)
        return path

    expired = ca.issue_cert(
        "127.0.0.1",
        "localhost",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    return Certs(
        dir=d,
        ca=write("ca.pem", ca.cert_pem),
        node=write(
            "node.pem",
            ca.issue_cert("127.0.0.1", "localhost", *names).private_key_and_cert_chain_pem,
        ),
        expired=write("expired.pem", expired.private_key_and_cert_chain_pem),
        othername=write(
            "othername.pem", ca.issue_cert("other.example").private_key_and_cert_chain_pem
        ),
        foreign_ca=write("foreign_ca.pem", foreign_ca.cert_pem),
        foreign=write(
            "foreign.pem", foreign_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem
        ),
    )
