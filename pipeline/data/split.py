"""Held-out splits by prompt: a prompt is in the training set or the held-out set, never both.
A dialogue is one prompt: its rows (one per assistant turn, each prompted by the dialogue so far)
share the messages up to and including its first user message, and are split by those, so no
turns of one dialogue land on both sides."""

from __future__ import annotations

import json

from pipeline.data.hashing import stable_hash


def dialogue_key(prompt) -> str:
    """A string prompt as is; a message list by its opening (system messages and the first user message)."""
    if isinstance(prompt, str):
        return prompt
    first_user = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), len(prompt) - 1)
    return json.dumps(list(prompt[: first_user + 1]))


def held_out(prompt, fraction: float) -> bool:
    """Stable across processes and runs."""
    return stable_hash(dialogue_key(prompt), 4) % 10_000 < fraction * 10_000
