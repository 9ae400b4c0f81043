"""The objective registry: for every objective, its kind, how a response splits
into steps, and how it is scored.

Objectives are declared in config; adding one needs no change in pipeline/:

    objectives:
      - {name: accuracy, kind: verifiable, verifier: math}
      - {name: politeness, kind: judged, splitter: sentences, judge: {callable: "my_pkg.judges:politeness"}}
      - name: helpfulness
        kind: judged
        judge: {rubric: "Is the response helpful? ...", verdicts: {HELPFUL: 1, UNHELPFUL: 0}}
      - {name: engagement, kind: dialogue, judge: {callable: "..."}, user: {persona: "You are a student ..."}}

Objectives are identified by task family and name: `objective_id` is the one rule. Two families
that both have `accuracy` train two PRM outputs and two policy heads (`math_word/accuracy`,
`tutoring/accuracy`) unless the config lists the name in `shared_objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.objectives.judges import CallableJudge, LLMJudge, import_callable
from pipeline.objectives.splitters import JOINERS, SPLITTERS
from pipeline.objectives.users import CallableUser, LLMUser

BUILTIN_VERIFIERS = {"math": "pipeline.objectives.math_verifier:math_accuracy"}
DEFAULT_SPLITTER = {"verifiable": "blank_lines", "judged": "sentences", "dialogue": "turns"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeSpec(_Strict):
    callable: str | None = None  # "package.module:function" -> score in [0, 1]
    rubric: str | None = None  # an LLM judge's instructions
    verdicts: dict[str, float] = Field(default_factory=dict)  # label -> score, e.g. {ENGAGING: 1, NOT ENGAGING: 0}
    template: str | None = None  # with {rubric}, {prompt}, {response}, {labels}
    max_tokens: int = 256
    temperature: float = 0.1

    @model_validator(mode="after")
    def _one(self):
        if (self.callable is None) == (self.rubric is None):
            raise ValueError("a judge has exactly one of 'callable' or 'rubric'")
        if self.rubric is not None and not self.verdicts:
            raise ValueError("an LLM judge (rubric) needs 'verdicts', e.g. {GOOD: 1, BAD: 0}")
        return self


class UserSpec(_Strict):
    callable: str | None = None  # fn(dialogue, meta) -> next user turn
    persona: str | None = None  # an LLM plays the user from this prompt
    max_tokens: int = 128
    temperature: float = 0.7

    @model_validator(mode="after")
    def _one(self):
        if (self.callable is None) == (self.persona is None):
            raise ValueError("a simulated user has exactly one of 'callable' or 'persona'")
        return self


class ObjectiveSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[^/]+$")  # no '/': it separates family and name in an id
    kind: Literal["verifiable", "judged", "dialogue"]
    splitter: str | None = None  # blank_lines | sentences | turns | "package.module:function"
    verifier: str | None = None  # "math" or "package.module:function" (verifiable)
    judge: JudgeSpec | None = None  # judged, dialogue
    user: UserSpec | None = None  # dialogue
    threshold: float = Field(0.5, ge=0, le=1)  # score >= threshold counts as a positive verdict

    @model_validator(mode="after")
    def _fits_kind(self):
        need = {"verifiable": ("verifier",), "judged": ("judge",), "dialogue": ("judge", "user")}[self.kind]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} objective needs {' and '.join(missing)}")
        if self.kind == "verifiable" and self.judge is not None:
            raise ValueError("a verifiable objective is scored by its verifier, not a judge")
        return self


def objective_id(family: str, name: str, shared=()) -> str:
    """The id an objective's labels, pairs, PRM output and policy head carry: `<family>/<name>`,
    or the bare `name` when the config declares it shared (one head / output for every family with it)."""
    return name if name in shared else f"{family}/{name}"


def resolve_objective(key: str, ids, what: str = "objective") -> str:
    """A user's reference to an objective (config key, request weight) as one of `ids`: the full id,
    or a bare name that ends exactly one id. Unknown or ambiguous: a ValueError naming the candidates."""
    ids = list(ids)
    if key in ids:
        return key
    hits = [i for i in ids if i.rsplit("/", 1)[-1] == key]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ValueError(f"{what} {key!r} is ambiguous: it names {len(hits)} objectives {hits}; use the full id")
    raise ValueError(f"{what} {key!r} is not an objective here; known objectives: {ids}")


def resolve_keys(mapping: dict, ids, what: str = "objective") -> dict:
    """`mapping` with every key resolved (resolve_objective); two keys naming one id is an error."""
    out: dict = {}
    for k, v in mapping.items():
        i = resolve_objective(k, ids, what)
        if i in out:
            raise ValueError(f"{what} {k!r} names {i!r}, which another key already names")
        out[i] = v
    return out


@dataclass
class Objective:
    name: str
    kind: str
    splitter: str
    split: Callable
    scorer: Any  # .score_batch(items) -> list[float | None]; .stats
    user: Any = None  # dialogue objectives: .reply_batch(dialogues, metas)
    threshold: float = 0.5

    @property
    def joiner(self) -> str:
        return JOINERS.get(self.splitter, "\n\n")

    def score_batch(self, items: list[dict]) -> list[float | None]:
        """items: {prompt, response (text, or the dialogue's messages after the prompt), reference, meta}."""
        return self.scorer.score_batch(items)

    def score(self, prompt, response, reference=None, meta=None) -> float | None:
        return self.score_batch([{"prompt": prompt, "response": response, "reference": reference, "meta": meta}])[0]


def build_objective(spec: ObjectiveSpec | dict, engine=None) -> Objective:
    """A runnable objective; `engine` (with .generate) serves LLM judges and LLM users."""
    spec = spec if isinstance(spec, ObjectiveSpec) else ObjectiveSpec.model_validate(spec)
    splitter = spec.splitter or DEFAULT_SPLITTER[spec.kind]
    split = SPLITTERS[splitter] if splitter in SPLITTERS else import_callable(splitter)
    if spec.kind == "verifiable":
        scorer = CallableJudge(BUILTIN_VERIFIERS.get(spec.verifier, spec.verifier))
    elif spec.judge.callable:
        scorer = CallableJudge(spec.judge.callable)
    else:
        j = spec.judge
        kw = {"template": j.template} if j.template else {}
        scorer = LLMJudge(j.rubric, j.verdicts, engine, max_tokens=j.max_tokens, temperature=j.temperature, **kw)
    user = None
    if spec.user is not None:
        u = spec.user
        user = CallableUser(u.callable) if u.callable else LLMUser(u.persona, engine, max_tokens=u.max_tokens,
                                                                   temperature=u.temperature)
    return Objective(spec.name, spec.kind, splitter, split, scorer, user, spec.threshold)


def build_objectives(specs: list[ObjectiveSpec | dict], engine=None) -> dict[str, Objective]:
    out: dict[str, Objective] = {}
    for s in specs:
        o = build_objective(s, engine)
        if o.name in out:
            raise ValueError(f"objective {o.name!r} is declared twice")
        out[o.name] = o
    return out
