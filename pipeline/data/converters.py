"""Public data sets into our records (for the GPU configs of jobs/configs/gpu/).

- UltraFeedback (openbmb/UltraFeedback): per-aspect ratings of several completions
  per instruction -> one preference pair per (instruction, aspect): the best-rated
  completion on that aspect against the worst, kept when their ratings differ by at
  least `min_margin` rating points (the paper's human-values pairs: helpfulness, honesty,
  truthfulness). Scores (`chosen_score`, `rejected_score`, `scores`) are the ratings mapped from
  1-5 onto [0, 1] ((r - 1) / 4), the scale of the PRM's rewards, so MODPO margins that mix them
  with PRM-scored pairs add like with like.
- MATH (hendrycks competition math, e.g. EleutherAI/hendrycks_math): problems with
  the boxed answer of the reference solution as `reference`, task `math_word` (its
  verifier is math-verify; its step splitter fits MATH solutions).
A row that lacks what it needs is an error naming the source and row, never skipped.
"""

from __future__ import annotations

import json
import re

from pipeline.data.records import RecordError

UF_ASPECTS = ("helpfulness", "honesty", "truthfulness", "instruction_following")
UF_RATINGS = (1.0, 5.0)  # UltraFeedback's rating range
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _rating(completion: dict, aspect: str, source: str, row: int) -> float | None:
    ann = (completion.get("annotations") or {}).get(aspect)
    if ann is None:
        raise RecordError(source, row, f"completions.annotations.{aspect}", "missing")
    r = ann.get("Rating") if isinstance(ann, dict) else ann
    if r in (None, "N/A"):
        return None
    try:
        x = float(r)
    except (TypeError, ValueError):
        raise RecordError(source, row, f"completions.annotations.{aspect}.Rating", f"not a number: {r!r}") from None
    if not UF_RATINGS[0] <= x <= UF_RATINGS[1]:
        raise RecordError(source, row, f"completions.annotations.{aspect}.Rating", f"{r!r} is outside {UF_RATINGS}")
    return x


def _unit(rating: float) -> float:
    """A 1-5 rating on the rewards' [0, 1] scale."""
    lo, hi = UF_RATINGS
    return (rating - lo) / (hi - lo)


def ultrafeedback_pairs(rows: list[dict], aspects: list[str], min_margin: float = 1.0,
                        source: str = "ultrafeedback") -> tuple[list[dict], dict]:
    """-> (preference rows, counts of skipped (instruction, aspect) by reason)."""
    bad = sorted(set(aspects) - set(UF_ASPECTS))
    if bad:
        raise ValueError(f"unknown UltraFeedback aspect(s) {bad}; use {list(UF_ASPECTS)}")
    out, skipped = [], {"too_few_rated": 0, "margin": 0}
    for i, r in enumerate(rows):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise RecordError(source, i, "instruction", "missing or empty")
        comps = r.get("completions")
        if not isinstance(comps, list):
            raise RecordError(source, i, "completions", "must be a list")
        for aspect in aspects:
            rated = [(s, c["response"], c) for c in comps if (s := _rating(c, aspect, source, i)) is not None]
            if len(rated) < 2:
                skipped["too_few_rated"] += 1
                continue
            hi, lo = max(rated, key=lambda x: x[0]), min(rated, key=lambda x: x[0])
            if hi[0] - lo[0] < min_margin:
                skipped["margin"] += 1
                continue
            out.append({"id": f"{r.get('source', 'uf')}-{i}-{aspect}", "prompt": [{"role": "user", "content": r["instruction"]}],
                        "chosen": hi[1], "rejected": lo[1], "objective": aspect, "chosen_score": _unit(hi[0]),
                        "rejected_score": _unit(lo[0]), "ref_chosen_logp": None, "ref_rejected_logp": None,
                        # both responses' ratings on every aspect rated for both (MODPO's margins), on [0, 1]
                        "scores": [{"objective": a, "chosen": _unit(sc), "rejected": _unit(sr)} for a in aspects
                                   if (sc := _rating(hi[2], a, source, i)) is not None
                                   and (sr := _rating(lo[2], a, source, i)) is not None]})
    return out, skipped


def boxed_answer(solution: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced)."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i:j]
    return None


def math_problems(rows: list[dict], split: str, source: str = "math") -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        for f in ("problem", "solution"):
            if not isinstance(r.get(f), str):
                raise RecordError(source, i, f, "missing")
        ans = boxed_answer(r["solution"])
        if ans is None:
            raise RecordError(source, i, "solution", "has no \\boxed{} answer")
        meta = {k: r[k] for k in ("level", "type") if k in r}
        out.append({"id": f"math-{split}-{i}", "task": "math_word",
                    "prompt": [{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": r["problem"]}],
                    "reference": ans, "meta": json.dumps(meta)})
    return out


def math_sft(rows: list[dict], split: str) -> list[dict]:
    """The reference solutions as SFT demonstrations (the paper's math SFT data is of this kind)."""
    return [{"id": f"math-{split}-{i}-demo", "prompt": p["prompt"],
             "completion": re.sub(r"\n{3,}", "\n\n", r["solution"].strip())}
            for i, (r, p) in enumerate(zip(rows, math_problems(rows, split)))]
