"""Step splitters: how a response is cut into the steps a PRM scores.

- blank_lines (math): steps are the paragraphs between blank lines.
- sentences (prose): a step ends at a paragraph break or at sentence-final
  punctuation, but not after an abbreviation ("e.g.", "Dr.") and not after a bare
  list marker ("1.", "A)", "Step 3:").
- turns (dialogue): steps are the assistant's turns.
"""

from __future__ import annotations

import re
from typing import Callable

ABBREVIATIONS = {
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "al.", "dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "jr.", "sr.",
    "no.", "fig.", "approx.", "inc.", "ltd.", "co.", "mt.", "a.m.", "p.m.", "u.s.", "u.k.", "ph.d.",
}
# A line holding only a list marker: "1.", "12)", "a.", "B)", "iv.", "Step 3:", "-", "*".
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[A-Za-z][.)]|[ivxlcdmIVXLCDM]+[.)]|step\s+\d+\s*[:.]|[-*\u2022])$", re.IGNORECASE)
_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*(?=\s|$)")
_PARA = re.compile(r"\n\s*\n")


def split_blank_lines(text: str) -> list[str]:
    return [p.strip() for p in _PARA.split(text) if p.strip()]


def _sentence_end_ok(text: str, start: int, end: int) -> bool:
    """Is the punctuation at text[start:end] a real sentence end?"""
    line_start = text.rfind("\n", 0, start) + 1
    if _LIST_MARKER.match(text[line_start:end]):
        return False
    word = text[:end].split()[-1].lower().rstrip("\"')]\u201d\u2019") if text[:end].split() else ""
    if word in ABBREVIATIONS or (word.endswith(".") and "." in word[:-1] and len(word) <= 6):  # "e.g." forms
        return False
    return True


def split_sentences(text: str) -> list[str]:
    steps = []
    for para in split_blank_lines(text):
        pos = 0
        for m in _END.finditer(para):
            if _sentence_end_ok(para, m.start(), m.end()):
                chunk = para[pos : m.end()].strip()
                if chunk:
                    steps.append(chunk)
                pos = m.end()
        if para[pos:].strip():
            steps.append(para[pos:].strip())
    return steps


def split_turns(dialogue: list[dict] | str, role: str = "assistant") -> list[str]:
    """The `role` turns of a dialogue (a list of messages); a plain string is one turn."""
    if isinstance(dialogue, str):
        return [dialogue] if dialogue.strip() else []
    return [m["content"] for m in dialogue if m["role"] == role]


SPLITTERS: dict[str, Callable] = {"blank_lines": split_blank_lines, "sentences": split_sentences, "turns": split_turns}
JOINERS: dict[str, str] = {"blank_lines": "\n\n", "sentences": " ", "turns": "\n\n"}
