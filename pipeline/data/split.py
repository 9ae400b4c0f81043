"""Held-out splits by prompt: a prompt is in the training set or the held-out set, never both."""

from __future__ import annotations

import json

from pipeline.data.hashing import stable_hash


def held_out(prompt, fraction: float) -> bool:
    """Stable across processes and runs."""
    key = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return stable_hash(key, 4) % 10_000 < fraction * 10_000
