"""Objectives: kind, step splitter, and scorer (verifier, judge, or judge + simulated user)."""

from pipeline.objectives.judges import CallableJudge, LLMJudge, import_callable, parse_verdict
from pipeline.objectives.registry import (JudgeSpec, Objective, ObjectiveSpec, UserSpec, build_objective, build_objectives,
                                         objective_id, resolve_keys, resolve_objective)
from pipeline.objectives.splitters import SPLITTERS, split_blank_lines, split_sentences, split_turns

__all__ = [
    "CallableJudge", "JudgeSpec", "LLMJudge", "Objective", "ObjectiveSpec", "SPLITTERS", "UserSpec",
    "build_objective", "build_objectives", "import_callable", "objective_id", "parse_verdict", "resolve_keys", "resolve_objective", "split_blank_lines",
    "split_sentences", "split_turns",
]
