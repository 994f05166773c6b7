"""Baton's RSA key for caching_sha2_password's full login over plain text.

Without TLS a caching_sha2_password client that must send its password asks the server for
its RSA public key (a 0x02 packet) and sends RSA-OAEP(password + NUL XOR nonce), as MySQL 8.4
does (`caching_sha2_password_private_key_path`). Baton answers with its own key: read from
`proxy.rsa_private_key` (a PEM file) when set, so that clients may pin the public key
(`server_public_key_path`); otherwise generated at start, one per process (a client that asks
for the key gets the one of the process that serves it, so this needs no coordination).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

GENERATED_BITS = 2048  # MySQL's own generated key's size


class RsaKey:
    """The private key, and the public key as the PEM a client is sent."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key
        self.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.size = key.key_size // 8  # bytes of every ciphertext

    @classmethod
    def generate(cls) -> RsaKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_BITS))

    @classmethod
    def load(cls, path: str | Path) -> RsaKey:
        """A PEM private key (unencrypted); ValueError says what is wrong with the file."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: not an RSA private key")
        return cls(key)

    def unwrap(self, ciphertext: bytes, our_nonce: bytes) -> bytes | None:
        """The password a client encrypted for `our_nonce`, or None if the ciphertext is not
        one (wrong key, wrong length, bad padding, no NUL at the end)."""
        if len(ciphertext) != self.size:
            return None
        try:
            plain = self._key.decrypt(
                ciphertext,
                padding.OAEP(
                    mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
                ),
            )
        except ValueError:
            return None
        nonce = our_nonce[:20]
        clear = bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(plain))
        if not clear.endswith(b"\x00") or b"\x00" in clear[:-1]:
            return None
        return clear[:-1]
