"""Record contracts between stages: one pydantic row model (validation, with field
names in every error) and one Arrow schema (storage) per record kind.

Labels and masks use explicit numeric types, never bool (TRL #2127: a bool label
column turned -100 into True).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Row(BaseModel):
    # Extra columns (TRL data sets often carry some) are ignored, and reported by the reader.
    model_config = ConfigDict(extra="ignore")


class ProblemRow(_Row):
    id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    reference: str | None = None
    meta: str = "{}"  # JSON object, kept as text so every stage can carry any metadata

    @field_validator("meta", mode="before")
    @classmethod
    def _meta_json(cls, v: Any) -> str:
        if isinstance(v, dict):
            return json.dumps(v, sort_keys=True)
        if v is None:
            return "{}"
        if isinstance(v, str):
            try:
                if isinstance(json.loads(v), dict):
                    return v
            except json.JSONDecodeError:
                pass
            raise ValueError("must be a JSON object")
        raise ValueError(f"must be a JSON object, got {type(v).__name__}")


class TrajectoryRow(_Row):
    id: str = Field(min_length=1)
    problem_id: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    steps: list[str] = Field(min_length=1)
    final: str
    outcome: float | None = None
    policy: str
    # Dialogues: every message after the prompt (the policy's turns are `steps`).
    turns: list[Message] | None = None


class StepwiseRow(_Row):
    """TRL's stepwise-supervision format, plus the objective and how labels were made."""

    id: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    completions: list[str] = Field(min_length=1)
    objective: str = Field(min_length=1)
    # One label per step; None marks a step with no label (masked in training, never 0).
    labels: list[float | None]
    label_kind: Literal["soft", "hard"]
    rollouts_per_step: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if len(self.labels) != len(self.completions):
            raise ValueError(
                f"labels has {len(self.labels)} entries but completions has {len(self.completions)}"
            )
        if self.label_kind == "hard" and any(x not in (None, 0.0, 1.0) for x in self.labels):
            raise ValueError("hard labels must be 0 or 1 (or null for a missing label)")
        return self


class ObjectiveScores(BaseModel):
    model_config = ConfigDict(extra="forbid")
    objective: str = Field(min_length=1)
    chosen: float = Field(allow_inf_nan=False)
    rejected: float = Field(allow_inf_nan=False)


class PreferenceRow(_Row):
    id: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    chosen: str
    rejected: str
    objective: str = Field(min_length=1)
    chosen_score: float | None = None
    rejected_score: float | None = None
    # every objective the pair's responses were scored on (jobs.build_pairs): MODPO's margins
    scores: list[ObjectiveScores] | None = None
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


class SFTRow(_Row):
    id: str = Field(min_length=1)
    prompt: list[Message] = Field(min_length=1)
    completion: str = Field(min_length=1)


ROW_MODELS: dict[str, type[_Row]] = {
    "problem": ProblemRow,
    "trajectory": TrajectoryRow,
    "stepwise": StepwiseRow,
    "preference": PreferenceRow,
    "sft": SFTRow,
}

SCHEMAS: dict[str, pa.Schema] = {
    "problem": pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("prompt", MESSAGES, nullable=False),
            pa.field("reference", pa.string()),
            pa.field("meta", pa.string(), nullable=False),
        ]
    ),
    "trajectory": pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("problem_id", pa.string(), nullable=False),
            pa.field("prompt", MESSAGES, nullable=False),
            pa.field("steps", pa.list_(pa.string()), nullable=False),
            pa.field("final", pa.string(), nullable=False),
            pa.field("outcome", pa.float32()),
            pa.field("policy", pa.string(), nullable=False),
            pa.field("turns", MESSAGES),
        ]
    ),
    "stepwise": pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("prompt", MESSAGES, nullable=False),
            pa.field("completions", pa.list_(pa.string()), nullable=False),
            pa.field("objective", pa.string(), nullable=False),
            pa.field("labels", pa.list_(pa.float32()), nullable=False),
            pa.field("label_kind", pa.string(), nullable=False),
            pa.field("rollouts_per_step", pa.int32(), nullable=False),
        ]
    ),
    "preference": pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("prompt", MESSAGES, nullable=False),
            pa.field("chosen", pa.string(), nullable=False),
            pa.field("rejected", pa.string(), nullable=False),
            pa.field("objective", pa.string(), nullable=False),
            pa.field("chosen_score", pa.float32()),
            pa.field("rejected_score", pa.float32()),
            pa.field("scores", pa.list_(pa.struct([("objective", pa.string()), ("chosen", pa.float32()),
                                                   ("rejected", pa.float32())]))),
            # Sequence log-probs are sums over hundreds of tokens: keep float64.
            pa.field("ref_chosen_logp", pa.float64()),
            pa.field("ref_rejected_logp", pa.float64()),
        ]
    ),
    "sft": pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("prompt", MESSAGES, nullable=False),
            pa.field("completion", pa.string(), nullable=False),
        ]
    ),
}

RecordKind = Literal["problem", "trajectory", "stepwise", "preference", "sft"]


def schema_for(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(SCHEMAS)}")
    return SCHEMAS[kind]
