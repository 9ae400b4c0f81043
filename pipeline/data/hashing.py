"""Stable hashing: the same value in every process, worker and run (Python's hash() is salted
per process, so workers that split data or seed samplers by it would disagree)."""

from __future__ import annotations

import hashlib


def stable_hash(text: str, digest_size: int = 8) -> int:
    """A non-negative integer from `text` (digest_size bytes of blake2b, little-endian)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=digest_size).digest(), "little")


def stable_seed(*parts) -> int:
    """A 31-bit seed from any values (their repr), e.g. stable_seed(seed, problem_id, turn)."""
    return stable_hash(repr(parts), 4) & 0x7FFFFFFF


def stable_digest(text: str, length: int = 16) -> str:
    """A short hex digest of `text` (plans and fingerprints written to disk)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]
