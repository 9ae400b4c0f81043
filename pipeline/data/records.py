"""Row validation and TRL-format normalisation.

Users bring data in TRL's formats; these load as they are:
- preference: standard (`prompt`, `chosen`, `rejected` strings), conversational
  (message lists) and implicit-prompt (only `chosen` / `rejected` conversations);
- stepwise supervision: `prompt`, `completions`, `labels` (bool or float);
- SFT: prompt-completion (strings or messages) or `messages` (the last turn is the
  assistant's completion).
Missing fields that a whole file shares (`objective`, `label_kind`) come from the
reader's `defaults`; a missing `id` becomes `<file stem>-<row>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
from pydantic import ValidationError

from pipeline.data.schemas import ROW_MODELS, schema_for


class RecordError(ValueError):
    """A bad record: names the file, the row and the field."""

    def __init__(self, source: str, row: int, field: str, message: str):
        self.source, self.row, self.field, self.message = source, row, field, message
        super().__init__(f"{source}: row {row}: field '{field}': {message}")


@dataclass
class Rejected:
    source: str
    row: int
    field: str
    error: str
    record: Any


def _as_messages(value: Any, role: str = "user") -> Any:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


def _assistant_text(value: Any, field: str) -> Any:
    """A TRL conversational completion ([{"role": "assistant", ...}]) -> its text."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise _FieldError(field, "must be a string or a single assistant message")
        return value[0].get("content")
    return value


class UnparseableRow(str):
    """A JSONL line that is not JSON: validation reports it as a bad row, never skips it."""

    def __new__(cls, line: str, error: str):
        obj = super().__new__(cls, line)
        obj.error = error
        return obj


class _FieldError(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def _split_implicit(chosen: list, rejected: list) -> tuple[list, Any, Any]:
    """Implicit-prompt preference: the shared prefix of both conversations is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise _FieldError("prompt", "missing, and chosen/rejected share no prefix to infer it from")
    return prompt, _assistant_text(c, "chosen"), _assistant_text(r, "rejected")


def normalise(kind: str, row: dict, defaults: dict | None = None) -> dict:
    """Map TRL-style rows onto our record fields (no validation here)."""
    row = dict(row)
    for key, value in (defaults or {}).items():
        if row.get(key) is None:
            row[key] = value
    if kind == "preference":
        if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            row["prompt"], row["chosen"], row["rejected"] = _split_implicit(row["chosen"], row["rejected"])
        row["chosen"] = _assistant_text(row.get("chosen"), "chosen")
        row["rejected"] = _assistant_text(row.get("rejected"), "rejected")
    elif kind == "sft":
        if "messages" in row and "prompt" not in row:
            msgs = row.pop("messages")
            if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                raise _FieldError("messages", "must end with an assistant message after at least one other")
            row["prompt"], row["completion"] = msgs[:-1], msgs[-1].get("content")
        row["completion"] = _assistant_text(row.get("completion"), "completion")
    elif kind == "stepwise":
        labels = row.get("labels")
        if isinstance(labels, list):
            row["labels"] = [float(x) if isinstance(x, bool) else x for x in labels]
        if isinstance(labels, list) and any(isinstance(x, bool) for x in labels):
            row.setdefault("label_kind", "hard")
    if "prompt" in row:
        row["prompt"] = _as_messages(row["prompt"])
    return row


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "tolist"):
        return _json_safe(v.tolist())
    return v


def validate_rows(
    kind: str,
    rows: Iterable[dict],
    source: str,
    *,
    defaults: dict | None = None,
    id_prefix: str | None = None,
    skip_bad_rows: bool = False,
) -> tuple[pa.Table, list[Rejected], set[str]]:
    """Validate rows against the kind's contract.

    Returns (table of good rows, rejected rows, ignored column names). Raises
    RecordError at the first bad row unless `skip_bad_rows`.
    """
    model = ROW_MODELS[kind]
    fields = set(model.model_fields)
    good: list[dict] = []
    rejected: list[Rejected] = []
    ignored: set[str] = set()
    for i, raw in enumerate(rows):
        try:
            if isinstance(raw, UnparseableRow):
                raise _FieldError("<json>", f"not valid JSON: {raw.error}")
            if not isinstance(raw, dict):
                raise _FieldError("<row>", f"must be an object, got {type(raw).__name__}")
            row = normalise(kind, raw, defaults)
            if row.get("id") in (None, "") and "id" in fields:
                row["id"] = f"{id_prefix or 'row'}-{i}"
            for key in ("labels", "outcome", "chosen_score", "rejected_score", "ref_chosen_logp", "ref_rejected_logp"):
                vals = row.get(key)
                for x in vals if isinstance(vals, list) else [vals]:
                    if isinstance(x, float) and not math.isfinite(x):
                        raise _FieldError(key, f"must be finite, got {x!r}")
            ignored.update(k for k in row if k not in fields)
            good.append(model.model_validate(row).model_dump(exclude_none=False))
        except _FieldError as e:
            err = RecordError(source, i, e.field, e.message)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<row>"
            msg = first["msg"]
            if first["type"] != "missing" and "input" in first:
                msg += f" (got {_short(first['input'])})"
            err = RecordError(source, i, field, msg)
        else:
            continue
        if not skip_bad_rows:
            raise err
        rejected.append(Rejected(source, i, err.field, err.message, str(raw) if isinstance(raw, UnparseableRow) else _json_safe(raw)))
    for r in good:
        if "prompt" in r:
            r["prompt"] = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
    table = pa.Table.from_pylist(good, schema=schema_for(kind))
    return table, rejected, ignored


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
