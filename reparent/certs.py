"""Test and sandbox certificates, made with the openssl command: a CA, and certificates it
signs for 127.0.0.1 and localhost. For `baton sandbox up --tls` and the TLS tests; never for
production, where the operator's own PKI issues them.

EC P-256 keys: generated in milliseconds, and their handshakes cost a fraction of RSA's.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = 3650
SAN = "subjectAltName=IP:127.0.0.1,DNS:localhost"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class CertError(Exception):
    """openssl is missing or refused; the message has its own words."""


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def make_ca(folder: Path, name: str = "ca") -> Pair:
    """A self-signed CA in folder/name.pem and folder/name.key."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", *_KEY, "-days", str(DAYS), "-subj", f"/CN=Baton {name}",
        "-keyout", str(pair.key), "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def make_cert(folder: Path, name: str, ca: Pair) -> Pair:
    """A certificate for 127.0.0.1 and localhost signed by `ca`, in folder/name.pem and .key."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(SAN + "\n")
    _openssl(
        "req", "-new", *_KEY, "-subj", f"/CN={name}", "-keyout", str(pair.key), "-out", str(csr)
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", str(DAYS), "-extfile", str(ext), "-out", str(pair.cert),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    pair.key.chmod(0o600)
    return pair


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise CertError("the openssl command is not installed (apt-get install openssl)")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise CertError(f"openssl {args[0]}: {result.stderr.strip()}")
