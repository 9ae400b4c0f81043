"""Held-out splits by prompt: a prompt is in the training set or the held-out set, never both."""

from __future__ import annotations

import hashlib
import json


def held_out(prompt, fraction: float) -> bool:
    """Stable across processes and runs (hashlib, not the salted hash())."""
    key = prompt if isinstance(prompt, str) else json.dumps(prompt)
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")
    return h % 10_000 < fraction * 10_000
