"""Family (c): multi-turn tutoring with a simulated student.

The student brings a word problem (family (a)) and a wrong answer. The policy
plays the tutor; the simulated student (`student`, a programmatic user) replies
after each tutor turn. Objectives, both of kind dialogue (steps = tutor turns):
- `accuracy`: the student ends with the correct answer, and the tutor states
  nothing false (every "a op b = c" and "the answer is n" it writes holds);
- `engagement`: the tutor asks, scaffolds, and does not hand over the answer.
Handing over the answer wins accuracy fast and loses engagement: the pull the
paper's tutoring domain has.
"""

from __future__ import annotations

import json
import random
import re

from pipeline.objectives.math_verifier import is_correct
from pipeline.tasks import math_word

TUTOR_SYSTEM = ("You are a patient math tutor. Help the student find the answer on their own: ask one short "
                "question at a time about the next step, and never give away the final answer. Reply in one or "
                "two sentences.")
OBJECTIVES = [
    {"name": "accuracy", "kind": "dialogue", "splitter": "turns",
     "judge": {"callable": "pipeline.tasks.tutoring:accuracy"}, "user": {"callable": "pipeline.tasks.tutoring:student"}},
    {"name": "engagement", "kind": "dialogue", "splitter": "turns",
     "judge": {"callable": "pipeline.tasks.tutoring:engagement"}, "user": {"callable": "pipeline.tasks.tutoring:student"}},
]
STYLES = (("socratic", 0.35), ("leaker", 0.25), ("lecturer", 0.25), ("careless", 0.15))
MAX_TURNS = 4  # tutor turns per dialogue

_NUM = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_OP_WORDS = {"+": ("add", "plus", "sum", "more", "total", "join"), "-": ("subtract", "minus", "left", "take away", "remain", "difference"),
             "x": ("multiply", "times", "product", "each", "altogether")}


def _meta(meta) -> dict:
    return json.loads(meta) if isinstance(meta, str) else (meta or {})


def _nums(text: str) -> list[float]:
    return [float(x) for x in _NUM.findall(text.replace(",", ""))]


def _solved(dialogue: list[dict], steps: list) -> int:
    """Steps the student has worked out so far (its turns that state the next step's value)."""
    k = 0
    for m in dialogue:
        if m["role"] == "user" and k < len(steps) and float(steps[k][1]) in _nums(m["content"]):
            k += 1
    return k


def student(dialogue: list[dict], meta) -> str:
    """The simulated student's next turn, deterministic given the dialogue.

    It works out the next step when the tutor asks about it (a question that names
    that step's numbers or its operation); it repeats an answer it is handed; a
    statement with no question, or a question about nothing in the problem, gets
    it nowhere.
    """
    meta = _meta(meta)
    steps, answer = meta["steps"], float(meta["values"][-1])
    tutor = dialogue[-1]["content"] if dialogue and dialogue[-1]["role"] == "assistant" else ""
    if answer in _nums(tutor) and answer not in meta["quantities"]:
        return f"Oh, so the answer is {_fmt(answer)}. Thanks!"
    first_user = next(i for i, m in enumerate(dialogue) if m["role"] == "user")
    k = _solved(dialogue[first_user + 1 :], steps)  # the opening states a wrong answer, not a step
    if k >= len(steps):
        return f"So the answer is {_fmt(answer)}."
    expr, value = steps[k]
    operands = [float(x) for x in _NUM.findall(expr)]
    op = "x" if " x " in expr else ("-" if " - " in expr else "+")
    low = tutor.lower()
    asks = "?" in tutor
    on_step = any(o in _nums(tutor) for o in operands) or any(w in low for w in _OP_WORDS[op])
    if asks and on_step:
        if k == len(steps) - 1:
            return f"{expr} = {_fmt(value)}, so the answer is {_fmt(value)}!"
        return f"Is it {expr} = {_fmt(value)}?"
    if asks:
        return "I'm not sure what you mean. Can you give me a hint?"
    return "Okay... but I still don't know what to do next."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def done(dialogue: list[dict], meta) -> bool:
    """The episode ends once the student states an answer."""
    return bool(dialogue) and dialogue[-1]["role"] == "user" and "answer is" in dialogue[-1]["content"]


# ---------------------------------------------------------------- judges

_CLAIM = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-x×*/]|\\times)\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_ANSWER_CLAIM = re.compile(r"answer is\s*\$?\\?(?:boxed\{)?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def false_claims(text: str, answer: float) -> int:
    """Arithmetic statements in `text` that do not hold, plus wrong 'the answer is n' claims."""
    bad = 0
    for a, op, b, c in _CLAIM.findall(text.replace(",", "")):
        a, b, c = float(a), float(b), float(c)
        v = {"+": a + b, "-": a - b, "/": a / b if b else None}.get(op, a * b)
        bad += v is None or abs(v - c) > 1e-6
    bad += sum(abs(float(n) - answer) > 1e-6 for n in _ANSWER_CLAIM.findall(text))
    return bad


def _turns(response) -> list[dict]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def accuracy(prompt, response, reference, meta) -> float:
    """1 when the student's last turn states the correct answer and the tutor said nothing false."""
    meta = _meta(meta)
    turns = _turns(response)
    answer = float(reference if reference is not None else meta["values"][-1])
    if any(false_claims(m["content"], answer) for m in turns if m["role"] == "assistant"):
        return 0.0
    student_turns = [m["content"] for m in turns if m["role"] == "user"]
    return 1.0 if student_turns and is_correct(student_turns[-1], _fmt(answer)) else 0.0


def engagement(prompt, response, reference, meta) -> float:
    """Mean over tutor turns of: asks one question (one or two '?'), grounded in the problem
    (names one of its numbers, a result the student reached, or the step's operation), and
    does not state the final answer before the student has; halved past 45 words.
    A dialogue with no tutor turn scores 0."""
    meta = _meta(meta)
    answer = float(meta["values"][-1])
    grounding = {float(q) for q in meta["quantities"]} | {float(v) for v in meta["values"][:-1]}
    scores, student_said = [], set()
    opening = prompt[-1]["content"] if prompt else ""
    for m in _turns(response):
        if m["role"] == "user":
            student_said |= set(_nums(m["content"]))
            continue
        text = m["content"]
        nums = set(_nums(text))
        leak = answer in nums and answer not in student_said and answer not in grounding
        question = 1 <= text.count("?") <= 2
        words = set(re.findall(r"[a-z]+", text.lower()))
        grounded = bool(nums & (grounding | student_said)) or any(w in words for ws in _OP_WORDS.values() for w in ws)
        s = float(question and grounded and not leak and text.strip() != opening.strip())
        scores.append(s * (0.5 if len(text.split()) > 45 else 1.0))
    return round(sum(scores) / len(scores), 4) if scores else 0.0


# ---------------------------------------------------------------- generation

def _tutor_turns(style: str, steps: list, answer: float, r: random.Random) -> list[str]:
    """Scripted tutor turns for one demonstration style (the student's replies come from `student`)."""
    asks = []
    for expr, value in steps:
        a, op, b = expr.split(" ")
        word = {"x": "multiply", "-": "take away", "+": "add"}[op]
        asks.append(r.choice([f"Let's look at one part first: what do you get if you {word} {a} and {b}?",
                              f"Good start. What is {a} {op} {b}?",
                              f"Think about the numbers {a} and {b}. What should we do with them, and what do you get?"]))
    if style == "socratic":
        return asks
    if style == "careless":  # asks, but states a false computation along the way
        expr, value = steps[0]
        return [f"We know {expr} = {_fmt(value + r.choice([-2, -1, 1, 2]))}. " + asks[min(1, len(asks) - 1)]] + asks[1:]
    if style == "leaker":
        work = ", then ".join(f"{e} = {_fmt(v)}" for e, v in steps)
        return [f"The answer is {_fmt(answer)}: {work}."]
    return [f"First you need {steps[0][0]} = {_fmt(steps[0][1])}, and then you continue the same way with the other numbers."]


def _opening(question: str, answer: float, r: random.Random) -> str:
    wrong = answer + r.choice([-10, -5, -2, 2, 5, 10])
    return f"Can you help me with this problem? {question} I got {_fmt(wrong)} but I'm not sure."


def dialogue_prompt(question: str, opening: str) -> list[dict]:
    return [{"role": "system", "content": TUTOR_SYSTEM}, {"role": "user", "content": opening}]


def generate(n: int, seed: int, split: str = "train", exclude: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(problem records, SFT records). A problem's prompt is the dialogue's opening; each tutor turn
    of a demonstration dialogue is one SFT record (prompt = the dialogue before it)."""
    # a stream of its own, not family (a)'s problems; `exclude` holds tutoring prompts, which contain the question
    base, _ = math_word.generate(n, seed + 7919, split, exclude_within=exclude)
    r = random.Random(f"tutoring/{split}/{seed}")
    styles, weights = zip(*STYLES)
    problems, sft = [], []
    for i, p in enumerate(base):
        meta = json.loads(p["meta"])
        question, answer = p["prompt"][-1]["content"], float(p["reference"])
        prompt = dialogue_prompt(question, _opening(question, answer, r))
        style = r.choices(styles, weights)[0]
        pid = f"tutoring-{split}-{i}"
        tmeta = {"quantities": meta["quantities"], "values": meta["values"], "steps": meta["steps"], "demo_style": style}
        problems.append({"id": pid, "task": "tutoring", "prompt": prompt, "reference": p["reference"],
                         "meta": json.dumps(tmeta)})
        dialogue = list(prompt)
        for j, turn in enumerate(_tutor_turns(style, meta["steps"], answer, r)[:MAX_TURNS]):
            sft.append({"id": f"{pid}-demo-{j}", "prompt": list(dialogue), "completion": turn})
            dialogue.append({"role": "assistant", "content": turn})
            reply = student(dialogue, tmeta)
            dialogue.append({"role": "user", "content": reply})
            if done(dialogue, tmeta):
                break
    return problems, sft
