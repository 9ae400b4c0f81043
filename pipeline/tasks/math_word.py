"""Multi-step math word problems with SFT demonstrations of mixed quality.

Deterministic from a seed. Demonstrations mix styles on purpose, so a model
fine-tuned on them starts imperfect: some explain each step, some are terse,
some slip in one step (wrong final answer), some forget the boxed answer.
"""

from __future__ import annotations

import json
import random
from typing import Callable

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
STYLES = (("explained", 0.4), ("terse", 0.3), ("slip", 0.2), ("unboxed", 0.1))

# Each template: (question, steps as (explanation, expression, value) triples, answer).
Template = Callable[[random.Random], tuple[str, list[tuple[str, str, int]], int]]


def _shop(r: random.Random):
    item = r.choice(["apples", "books", "pencils", "stickers", "marbles"])
    a, b = r.randint(20, 90), r.randint(2, 19)
    c = r.randint(3, 40)
    q = f"A shop has {a} {item}. It sells {b} of them and then receives a delivery of {c} more. How many {item} does the shop have now?"
    s1 = a - b
    return q, [(f"After selling {b} {item}, the shop has", f"{a} - {b}", s1),
               (f"The delivery adds {c}, so the shop now has", f"{s1} + {c}", s1 + c)], s1 + c


def _boxes(r: random.Random):
    item = r.choice(["cookies", "cards", "eggs", "crayons"])
    n, k = r.randint(3, 12), r.randint(4, 12)
    g = r.randint(1, n * k // 2)
    q = f"Maya has {n} boxes with {k} {item} in each box. She gives away {g} {item}. How many {item} does she have left?"
    t = n * k
    return q, [(f"Altogether the boxes hold", f"{n} \\times {k}", t),
               (f"After giving away {g}, she has", f"{t} - {g}", t - g)], t - g


def _pages(r: random.Random):
    p, d = r.randint(5, 25), r.randint(2, 9)
    t = p * d + r.randint(10, 150)
    q = f"A book has {t} pages. Leo reads {p} pages every day for {d} days. How many pages does he still have to read?"
    done = p * d
    return q, [(f"In {d} days Leo reads", f"{p} \\times {d}", done),
               (f"Pages left to read:", f"{t} - {done}", t - done)], t - done


def _money(r: random.Random):
    price, qty = r.randint(2, 15), r.randint(2, 8)
    m = price * qty + r.randint(5, 60)
    thing = r.choice(["notebooks", "tickets", "sandwiches", "plants"])
    q = f"Sam has {m} dollars. He buys {qty} {thing} that cost {price} dollars each. How much money does he have left?"
    cost = price * qty
    return q, [(f"The {thing} cost", f"{qty} \\times {price}", cost),
               (f"Money left:", f"{m} - {cost}", m - cost)], m - cost


def _groups(r: random.Random):
    s, e, extra = r.randint(3, 9), r.randint(3, 12), r.randint(1, 9)
    more = r.randint(2, 20)
    q = (f"A teacher splits the class into {s} teams of {e} students, and {extra} students help as referees. "
         f"Then {more} students from another class join. How many students are there in total?")
    t1 = s * e
    return q, [(f"Students in teams:", f"{s} \\times {e}", t1),
               (f"Adding the {extra} referees gives", f"{t1} + {extra}", t1 + extra),
               (f"With the {more} new students the total is", f"{t1 + extra} + {more}", t1 + extra + more)], t1 + extra + more


TEMPLATES: dict[str, Template] = {"shop": _shop, "boxes": _boxes, "pages": _pages, "money": _money, "groups": _groups}


def _demo(style: str, steps: list[tuple[str, str, int]], answer: int, r: random.Random) -> tuple[str, int]:
    """A demonstration in `style`; returns (text, the answer it states)."""
    if style == "slip":  # one step off by a small amount; later steps carry the error
        k = r.randrange(len(steps))
        delta = r.choice([-3, -2, -1, 1, 2, 10])
        steps = [(e, x, v + (delta if i >= k else 0)) for i, (e, x, v) in enumerate(steps)]
        answer = steps[-1][2]
    if style == "terse":
        chain = ", ".join(f"{x} = {v}" for _, x, v in steps)
        return f"{chain}. \\boxed{{{answer}}}", answer
    body = "\n\n".join(f"{e} ${x} = {v}$." for e, x, v in steps)
    if style == "unboxed":
        return f"{body}\n\nSo the answer is {answer}.", answer
    return f"Let's work through it step by step.\n\n{body}\n\nThe answer is \\boxed{{{answer}}}.", answer


def generate(n: int, seed: int, split: str = "train", exclude: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(problem records, SFT records) for `n` problems of `split`, reproducible from `seed`."""
    r = random.Random(f"math_word/{split}/{seed}")
    problems, sft, seen = [], [], set(exclude or ())
    styles, weights = zip(*STYLES)
    while len(problems) < n:
        name = r.choice(sorted(TEMPLATES))
        question, steps, answer = TEMPLATES[name](r)
        if question in seen:
            continue
        seen.add(question)
        pid = f"math_word-{split}-{len(problems)}"
        style = r.choices(styles, weights)[0]
        text, _ = _demo(style, steps, answer, r)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        problems.append({"id": pid, "task": "math_word", "prompt": prompt, "reference": str(answer),
                         "meta": json.dumps({"template": name, "n_steps": len(steps)})})
        sft.append({"id": f"{pid}-demo", "prompt": prompt, "completion": text})
    return problems, sft


def splits(n_train: int, n_eval: int, seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """Train and held-out splits with no question in both."""
    train = generate(n_train, seed, "train")
    held = generate(n_eval, seed, "eval", exclude={p["prompt"][-1]["content"] for p in train[0]})
    return {"train": train, "eval": held}
