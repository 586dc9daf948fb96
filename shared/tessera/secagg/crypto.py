"""The cryptographic parts of secure aggregation, each from a maintained library.

- Key agreement: X25519 (`cryptography`), the shared secret stretched by HKDF-SHA256 with a
  label naming its purpose and the group, so one key pair never yields the same key twice.
- Device-to-device messages relayed by the server: AES-256-GCM (`cryptography`).
- Masks: the ChaCha20 keystream (`cryptography`) read as little-endian uint32 values.
- Secret sharing: Shamir over GF(2^128) (`pycryptodome`), per 16-byte block of the secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # an X25519 key, public or private
SEED_BYTES = 16  # a self-mask seed: one Shamir block
BLOCK = 16  # pycryptodome's Shamir shares secrets of exactly 16 bytes
NONCE_BYTES = 12


class SecretSharingError(ValueError):
    """Shares that cannot give the secret: too few, duplicated, or of unequal lengths."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(private=key.private_bytes_raw(), public=key.public_key().public_bytes_raw())


def public_key_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key (to check a reconstructed one)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, *, label: bytes) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256 of the X25519 secret, for `label`."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return derive(secret, label=label)


def derive(secret: bytes, *, label: bytes) -> bytes:
    """A 32-byte key from `secret` for one purpose (HKDF-SHA256, no salt: secrets are random)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def keystream_u32(key: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random uint32 values from a 32-byte key (ChaCha20, zero nonce: each key
    is used for one stream only)."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\0" * (4 * count))
    return np.frombuffer(stream, dtype="<u4").copy()


def seal(key: bytes, plaintext: bytes, *, context: bytes) -> bytes:
    """AES-256-GCM: a random nonce, then the ciphertext and tag; `context` is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, *, context: bytes) -> bytes:
    """The plaintext of `seal`; raises cryptography's InvalidTag if anything was altered."""
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)


def split_secret(secret: bytes, *, threshold: int, count: int) -> list[bytes]:
    """`count` Shamir shares of `secret` (a multiple of 16 bytes), any `threshold` of which
    give it back; share i (from 0) belongs to share index i + 1."""
    if not secret or len(secret) % BLOCK:
        raise ValueError(f"a shared secret is a multiple of {BLOCK} bytes, not {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"need 1 <= threshold <= count, got {threshold} and {count}")
    shares: list[bytearray] = [bytearray() for _ in range(count)]
    for start in range(0, len(secret), BLOCK):
        block = Shamir.split(threshold, count, secret[start : start + BLOCK], ssss=False)
        for index, share in block:
            shares[index - 1] += share
    return [bytes(share) for share in shares]


def combine_secret(shares: dict[int, bytes], *, threshold: int) -> bytes:
    """The secret from at least `threshold` shares keyed by share index (1-based)."""
    if len(shares) < threshold:
        raise SecretSharingError(f"{len(shares)} shares, {threshold} needed")
    lengths = {len(share) for share in shares.values()}
    if len(lengths) != 1 or (length := lengths.pop()) % BLOCK or not length:
        raise SecretSharingError("shares of unequal or invalid lengths")
    chosen = sorted(shares.items())[:threshold]
    return b"".join(
        Shamir.combine(
            [(index, share[start : start + BLOCK]) for index, share in chosen], ssss=False
        )
        for start in range(0, length, BLOCK)
    )
