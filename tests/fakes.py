"""A deterministic fake policy for labelling tests, with known true step values.

Every step of a test trajectory carries "value=v". From a prefix whose last step
says value=v, a request for n continuations returns exactly round(v * n) correct
ones ("\\boxed{<answer>} good") and the rest wrong ("\\boxed{-1} bad"), so Monte-Carlo
step values must come out as v exactly. Importable in Ray workers through
PYTHONPATH (tests/conftest.py). A fake, because the test needs a policy whose
true values are known; the real engines are tested in test_rollout.py.
"""

from __future__ import annotations

import re
import time


class FakePolicy:
    requests = 0  # continuations asked for (in-process tests count them)

    def __init__(self, model_dir: str | None = None, delay: float = 0.0):
        self.delay = delay

    def render(self, prompt: list[dict]) -> str:
        return "PROMPT " + prompt[-1]["content"] + "\nRESPONSE:"

    def complete(self, texts: list[str], *, n: int = 1, seeds=None, **kw) -> list[list[str]]:
        time.sleep(self.delay)
        out = []
        for t in texts:
            vals = re.findall(r"value=([0-9.]+)", t)
            v = float(vals[-1]) if vals else 0.0
            ans = re.search(r"answer=(-?\d+)", t).group(1)
            good = round(v * n)
            FakePolicy.requests += n
            out.append([f"\\boxed{{{ans}}} good" if j < good else "\\boxed{-1} bad" for j in range(n)])
        return out

    def generate(self, prompts: list[list[dict]], *, n: int = 1, **kw) -> list[list[str]]:
        return self.complete([self.render(p) for p in prompts], n=n, **kw)


def says_good(prompt, response, reference, meta) -> float:
    text = response if isinstance(response, str) else " ".join(m["content"] for m in response)
    return 1.0 if text.rstrip().endswith("good") else 0.0


class VariedPolicy:
    """Candidate k covers k + 1 of the topic's aspects (built-in assistant task), so longer candidates
    are more thorough and less concise: the two objectives disagree on every pair."""

    def __init__(self, model_dir: str | None = None):
        pass

    def render(self, prompt: list[dict]) -> str:
        return prompt[-1]["content"]

    def generate(self, prompts: list[list[dict]], *, n: int = 1, **kw) -> list[list[str]]:
        from pipeline.tasks.assistant import TOPICS

        out = []
        for p in prompts:
            aspects = next((a for t, a in TOPICS.items() if t in p[-1]["content"]), list(TOPICS.values())[0])
            out.append([" ".join(s for _, s in aspects[: k + 1]) for k in range(n)])
        return out
