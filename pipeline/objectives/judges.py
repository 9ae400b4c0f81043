"""Judges score a response (or a dialogue) for one objective.

- CallableJudge: a Python function named in config ("package.module:function"),
  called as fn(prompt, response, reference, meta) -> float in [0, 1].
- LLMJudge: a rubric prompt run on a generation engine (vLLM actors, or the
  transformers engine), whose output must name one of the rubric's verdicts. An
  output that names none is counted as unparseable and scored None: it is never
  read as a verdict.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable


def import_callable(target: str) -> Callable:
    """"pkg.module:function" -> the function, with a clear error."""
    if ":" not in target:
        raise ValueError(f"callable {target!r} must look like 'package.module:function'")
    mod_name, attr = target.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"callable {target!r}: cannot import {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"callable {target!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"callable {target!r} is not callable")
    return obj


@dataclass
class JudgeStats:
    calls: int = 0
    unparseable: int = 0
    examples: list[str] = field(default_factory=list)  # a few raw outputs that did not parse

    def as_dict(self) -> dict:
        return {"calls": self.calls, "unparseable": self.unparseable,
                "unparseable_rate": self.unparseable / self.calls if self.calls else 0.0}


class CallableJudge:
    def __init__(self, target: str):
        self.target, self.fn = target, import_callable(target)
        self.stats = JudgeStats()

    def score_batch(self, items: list[dict]) -> list[float | None]:
        out = []
        for it in items:
            self.stats.calls += 1
            v = self.fn(it["prompt"], it["response"], it.get("reference"), it.get("meta") or {})
            if v is None or not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"judge {self.target} returned {v!r}; judges return a score in [0, 1]")
            out.append(float(v))
        return out


DEFAULT_TEMPLATE = (
    "{rubric}\n\n[Conversation]\n{prompt}\n\n[Response to judge]\n{response}\n\n"
    'Reply with a JSON object: {{"analysis": "<one or two sentences>", "judgment": "<one of: {labels}>"}}'
)


def _render(messages_or_text: Any) -> str:
    if isinstance(messages_or_text, str):
        return messages_or_text
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages_or_text)


def parse_verdict(text: str, verdicts: dict[str, float]) -> float | None:
    """The score of the verdict `text` names, or None. JSON {"judgment": ...} first, then a
    'judgment:/verdict:' line, then a bare label. Longer labels match first ("NOT ENGAGING"
    before "ENGAGING"); a text naming two different verdicts is ambiguous: None."""
    labels = sorted(verdicts, key=len, reverse=True)
    for blob in reversed(re.findall(r"\{[^{}]*\}", text)):
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        val = str(obj.get("judgment", obj.get("verdict", ""))).strip().upper() if isinstance(obj, dict) else ""
        for lab in labels:
            if val == lab.upper():
                return verdicts[lab]
    m = re.search(r"(?:judg(?:e)?ment|verdict)\s*[:=]\s*\**\"?([A-Za-z _-]+)", text, re.IGNORECASE)
    if m:
        val = m.group(1).strip().upper()
        for lab in labels:
            if val.startswith(lab.upper()):
                return verdicts[lab]
    found, rest = set(), text.upper()
    for lab in labels:  # bare labels, longest first, each occurrence consumed
        pat = re.compile(r"\b" + re.escape(lab.upper()) + r"\b")
        if pat.search(rest):
            found.add(lab)
            rest = pat.sub(" ", rest)
    if len({verdicts[f] for f in found}) == 1:
        return verdicts[found.pop()]
    return None


class LLMJudge:
    def __init__(self, rubric: str, verdicts: dict[str, float], engine, *, template: str = DEFAULT_TEMPLATE,
                 max_tokens: int = 256, temperature: float = 0.1):
        if not verdicts:
            raise ValueError("an LLM judge needs verdicts, e.g. {ENGAGING: 1, NOT ENGAGING: 0}")
        self.rubric, self.verdicts, self.engine, self.template = rubric, verdicts, engine, template
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}
        self.stats = JudgeStats()

    def prompt(self, item: dict) -> list[dict]:
        text = self.template.format(rubric=self.rubric, prompt=_render(item["prompt"]),
                                    response=_render(item["response"]), labels=", ".join(self.verdicts))
        return [{"role": "user", "content": text}]

    def score_batch(self, items: list[dict]) -> list[float | None]:
        if self.engine is None:
            raise RuntimeError("this LLM judge has no generation engine; pass one to build_objectives(..., engine=)")
        outs = self.engine.generate([self.prompt(it) for it in items], **self.sampling)
        scores = []
        for samples in outs:
            self.stats.calls += 1
            s = parse_verdict(samples[0], self.verdicts)
            if s is None:
                self.stats.unparseable += 1
                if len(self.stats.examples) < 5:
                    self.stats.examples.append(samples[0][:300])
            scores.append(s)
        return scores
