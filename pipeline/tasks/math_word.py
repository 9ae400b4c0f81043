"""Family (a): multi-step math word problems.

Objectives: `accuracy` (verifiable: math-verify on the final answer) and
`engagement` (judged: an explanation a learner can follow; `engagement` below).
Deterministic from a seed. SFT demonstrations mix styles on purpose, so a model
fine-tuned on them starts imperfect on both objectives.
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable

from pipeline.objectives.splitters import split_blank_lines, split_sentences

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
OBJECTIVES = [
    {"name": "accuracy", "kind": "verifiable", "verifier": "math", "splitter": "blank_lines"},
    {"name": "engagement", "kind": "judged", "splitter": "blank_lines",
     "judge": {"callable": "pipeline.tasks.math_word:engagement"}},
]
STYLES = (("engaging", 0.3), ("explained", 0.25), ("terse", 0.22), ("slip", 0.15), ("rambling", 0.08))

# A step: (plain-language lead-in, LaTeX expression, value, operands).
Step = tuple[str, str, int, tuple[int, ...]]
Template = Callable[[random.Random], tuple[str, list[Step], list[int]]]


# Number ranges calibrated to a 135M model (2026-11-30): with totals up to ~375 and borrowing subtraction,
# SmolLM2-135M fine-tuned on these demonstrations wrote the right steps with the wrong differences
# ("143 - 49 = 112") and scored 0.05 accuracy; results now stay under ~80 (docs/tasks.md, "Calibration").
def _shop(r):
    item = r.choice(["apples", "books", "pencils", "stickers", "marbles"])
    a, b, c = r.randint(12, 40), r.randint(2, 9), r.randint(3, 20)
    q = f"A shop has {a} {item}. It sells {b} of them and then receives a delivery of {c} more. How many {item} does the shop have now?"
    s1 = a - b
    return q, [(f"after selling {b} {item}, the shop has", f"{a} - {b}", s1, (a, b)),
               (f"the delivery adds {c} more {item}, so the shop now has", f"{s1} + {c}", s1 + c, (s1, c))], [a, b, c]


def _boxes(r):
    item = r.choice(["cookies", "cards", "eggs", "crayons"])
    n, k = r.randint(2, 6), r.randint(2, 9)
    g = r.randint(1, n * k // 2)
    q = f"Maya has {n} boxes with {k} {item} in each box. She gives away {g} {item}. How many {item} does she have left?"
    t = n * k
    return q, [(f"the {n} boxes hold {k} {item} each, so altogether there are", f"{n} \\times {k}", t, (n, k)),
               (f"after giving away {g} {item}, she keeps", f"{t} - {g}", t - g, (t, g))], [n, k, g]


def _pages(r):
    p, d = r.randint(2, 9), r.randint(2, 5)
    t = p * d + r.randint(3, 30)
    q = f"A book has {t} pages. Leo reads {p} pages every day for {d} days. How many pages does he still have to read?"
    done = p * d
    return q, [(f"reading {p} pages a day for {d} days, Leo reads", f"{p} \\times {d}", done, (p, d)),
               (f"the book has {t} pages, so the pages still to read are", f"{t} - {done}", t - done, (t, done))], [t, p, d]


def _money(r):
    price, qty = r.randint(2, 9), r.randint(2, 5)
    m = price * qty + r.randint(3, 30)
    thing = r.choice(["notebooks", "tickets", "sandwiches", "plants"])
    q = f"Sam has {m} dollars. He buys {qty} {thing} that cost {price} dollars each. How much money does he have left?"
    cost = price * qty
    return q, [(f"{qty} {thing} at {price} dollars each cost", f"{qty} \\times {price}", cost, (qty, price)),
               (f"he started with {m} dollars, so the money left is", f"{m} - {cost}", m - cost, (m, cost))], [m, qty, price]


def _groups(r):
    s, e, extra, more = r.randint(2, 6), r.randint(2, 9), r.randint(1, 9), r.randint(2, 15)
    q = (f"A teacher splits the class into {s} teams of {e} students, and {extra} students help as referees. "
         f"Then {more} students from another class join. How many students are there in total?")
    t1 = s * e
    return q, [(f"{s} teams of {e} students make", f"{s} \\times {e}", t1, (s, e)),
               (f"adding the {extra} referees gives", f"{t1} + {extra}", t1 + extra, (t1, extra)),
               (f"with the {more} students who join, the total is", f"{t1 + extra} + {more}", t1 + extra + more, (t1 + extra, more))], [s, e, extra, more]


TEMPLATES: dict[str, Template] = {"shop": _shop, "boxes": _boxes, "pages": _pages, "money": _money, "groups": _groups}
_LEADS = ["First, ", "Next, ", "Then ", "Now ", "Finally, "]
_WHY = ["because that is what is left to count", "since each group adds the same amount",
        "so we keep track of every change", "which is the number we need for the next step"]


def _demo(style: str, question: str, steps: list[Step], r: random.Random) -> str:
    if style == "slip":  # one step off by a little; later steps carry the error
        k, delta = r.randrange(len(steps)), r.choice([-3, -2, -1, 1, 2, 10])
        steps = [(w, x, v + (delta if i >= k else 0), o) for i, (w, x, v, o) in enumerate(steps)]
    answer = steps[-1][2]
    if style == "terse":
        return ", ".join(f"{x} = {v}" for _, x, v, _ in steps) + f". \\boxed{{{answer}}}"
    if style == "engaging":
        body = [f"{_LEADS[min(i, 3)] if i < len(steps) - 1 else _LEADS[4]}{w} ${x} = {v}$, {r.choice(_WHY)}."
                for i, (w, x, v, _) in enumerate(steps)]
        return "\n\n".join(["Let's think about what the question asks and work through it together.", *body,
                            f"So the answer is \\boxed{{{answer}}}."])
    body = [f"{w[0].upper() + w[1:]} ${x} = {v}$." for w, x, v, _ in steps]
    if style == "rambling":  # correct, but padded: a learner loses the thread
        pad = "As we can see, this is a problem about numbers, and numbers are important in math."
        return "\n\n".join([pad, *[s for b in body for s in (b, pad)], f"The answer is \\boxed{{{answer}}}."])
    return "\n\n".join(["Let's work through it step by step.", *body, f"The answer is \\boxed{{{answer}}}."])


def generate(n: int, seed: int, split: str = "train", exclude: set[str] | None = None,
             exclude_within: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(problem records, SFT records) for `n` problems of `split`, reproducible from `seed`. No question in
    `exclude`, nor one contained in a text of `exclude_within` (tutoring's prompts wrap the question)."""
    r = random.Random(f"math_word/{split}/{seed}")
    problems, sft, seen = [], [], set(exclude or ())
    styles, weights = zip(*STYLES)
    while len(problems) < n:
        name = r.choice(sorted(TEMPLATES))
        question, steps, quantities = TEMPLATES[name](r)
        if question in seen or any(question in t for t in exclude_within or ()):
            continue
        seen.add(question)
        pid = f"math_word-{split}-{len(problems)}"
        style = r.choices(styles, weights)[0]
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        meta = {"template": name, "quantities": quantities, "values": [v for _, _, v, _ in steps],
                "steps": [[x.replace("\\times", "x"), v] for _, x, v, _ in steps], "demo_style": style}
        problems.append({"id": pid, "task": "math_word", "prompt": prompt, "reference": str(steps[-1][2]),
                         "meta": json.dumps(meta)})
        sft.append({"id": f"{pid}-demo", "prompt": prompt, "completion": _demo(style, question, steps, r)})
    return problems, sft


# ---------------------------------------------------------------- engagement judge

CUES = {"because", "so", "since", "means", "notice", "let's", "lets", "we", "us", "first", "next", "then", "now",
        "finally", "think", "remember", "check", "together", "which", "that's"}
_NUM = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]\d)")
_WORD = re.compile(r"[A-Za-z][A-Za-z']+")


def numbers(text: str) -> set[float]:
    return {float(x) for x in _NUM.findall(text.replace(",", ""))}


def _distinct_trigram_ratio(text: str) -> float:
    w = [x.lower() for x in _WORD.findall(text)]
    grams = list(zip(w, w[1:], w[2:]))
    return len(set(grams)) / len(grams) if len(grams) >= 10 else 1.0


def engagement(prompt, response, reference, meta) -> float:
    """An explanation a learner can follow, in [0, 1].

    A step counts as explained when it states a quantity of the problem or of the
    solution (grounded) in at least four words of plain language, without
    being a heap of connective words. The score multiplies:
      coverage   - share of the solution's intermediate results that explained steps show;
      guidance   - share of explained steps that talk to the learner (because, so, first, let's...);
      density    - share of steps that are explained (square root: one framing line is fine);
      repetition - falls when the text repeats itself (distinct word trigrams);
      length     - falls past twice the steps the solution needs.
    Length alone, repeated cue words and notation without words all score low.
    """
    meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
    text = response if isinstance(response, str) else " ".join(m["content"] for m in response)
    steps = split_blank_lines(text)
    if len(steps) == 1:
        steps = split_sentences(text)
    if not steps:
        return 0.0
    values = {float(v) for v in meta.get("values", [])}
    grounding = values | {float(q) for q in meta.get("quantities", [])}
    shown, explained, guided = set(), 0, 0
    for s in steps:
        words = [w.lower() for w in _WORD.findall(re.sub(r"\$[^$]*\$|\\[a-z]+", " ", s))]
        n_cues = sum(w in CUES for w in words)
        nums = numbers(s)
        if len(words) >= 4 and nums & grounding and n_cues <= 0.35 * len(words):
            explained += 1
            guided += n_cues > 0
            shown |= nums & values
    if not values or not explained:
        return 0.0
    coverage = len(shown) / len(values)
    guidance = 0.4 + 0.6 * guided / explained
    density = (explained / len(steps)) ** 0.5
    repetition = min(1.0, _distinct_trigram_ratio(text) / 0.7)
    length = min(1.0, (2 * len(values) + 2) / len(steps))
    return round(coverage * guidance * density * repetition * length, 4)
