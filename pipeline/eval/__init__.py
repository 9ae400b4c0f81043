"""Evaluation: per-objective scores of a policy on the built-in tasks."""
