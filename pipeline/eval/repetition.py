"""Repetition in the policy's own words: a degenerate policy (one that loops) named as such in the report.

seq-rep-n (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"): the share of a
response's word n-grams that repeat an earlier one, 1 - distinct / total. 0 for text without a repeated
n-gram; a loop ("Good start. Good question. Good start. ...") drives it towards 1. A dialogue's value is
over its assistant turns together, so a tutor that says the same thing every turn counts as looping.
"""

from __future__ import annotations

import json
from collections import defaultdict

LOOPING = 0.5  # seq-rep-4 at or above this: half the response's 4-grams repeat earlier ones


def stored_messages(response: str) -> list[dict] | None:
    """A stored response's dialogue messages (evaluate() stores a dialogue as JSON messages), else None."""
    try:
        msgs = json.loads(response)
    except ValueError:
        return None
    return msgs if isinstance(msgs, list) and all(isinstance(m, dict) and "content" in m for m in msgs) else None


def policy_text(response: str) -> str:
    """The policy's words in a stored response: the text itself, or a dialogue's assistant turns."""
    msgs = stored_messages(response)
    if msgs is not None:
        return " ".join(str(m["content"]) for m in msgs if m.get("role") == "assistant")
    try:  # a response stored as a JSON string
        return s if isinstance(s := json.loads(response), str) else response
    except ValueError:
        return response


def seq_rep(text: str, n: int = 4) -> float:
    """1 - distinct word n-grams / word n-grams (0 when the text has fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_table(responses: list[dict], n: int = 4) -> list[dict]:
    """Per (policy, weights, decoding, task): responses, mean seq-rep-n and the share at or above LOOPING."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in responses:
        groups[(r["policy"], r["weights"] or "", r["decoding"], r["task"])].append(seq_rep(policy_text(r["response"]), n))
    return [{"policy": p, "weights": w or None, "decoding": d, "task": t, "n": len(v), "mean": sum(v) / len(v),
             "looping": sum(x >= LOOPING for x in v) / len(v)} for (p, w, d, t), v in sorted(groups.items())]


def degenerate(table: list[dict], base: str = "sft", margin: float = 0.2) -> list[dict]:
    """The rows whose share of looping responses exceeds the base policy's on the same task by `margin`."""
    ref = {r["task"]: r["looping"] for r in table if r["policy"] == base and r["decoding"] == "plain"}
    return [r for r in table if r["policy"] != base and r["task"] in ref and r["looping"] >= ref[r["task"]] + margin]
