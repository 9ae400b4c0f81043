"""Row validation and TRL-format normalisation.

Users bring data in TRL's formats; these load as they are:
- preference: standard (`prompt`, `chosen`, `rejected` strings), conversational
  (message lists) and implicit-prompt (only `chosen` / `rejected` conversations);
- stepwise supervision: `prompt`, `completions`, `labels` (bool or float);
- SFT: prompt-completion (strings or messages) or `messages` (the last turn is the
  assistant's completion).
Missing fields that a whole file shares (`objective`, `label_kind`) come from the
reader's `defaults`; a missing `id` becomes `<file stem>-<row>`.

Beyond the row models, every row is checked against what its Arrow column can hold
(valid UTF-8 strings, int32/float32 ranges), step labels against their range, and ids
against the ids already read, so a bad value is a row error here, never a bare Arrow
error at the end of a read, nor a wrong training target.
"""

from __future__ import annotations

import json
import math
from collections import Counter
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


class UnsupportedFormat(ValueError):
    """A file the readers do not read: names it and lists what they do read."""


class EmptyInput(ValueError):
    """A read that found no rows at all."""


class InputError(ValueError):
    """One input of a shard stage (a problem, a trajectory) that cannot be processed as given:
    missing its reference, a prompt longer than the engine's context. The stage quarantines it to
    `<out_dir>/_failed/` and counts it; any other exception (out of memory, a bug) stops the job."""


# TRL's "ignore" label (the loss's ignore_index): read as a missing step label (null), and counted.
IGNORE_LABEL = -100
# Soft step labels: MC success rates, normalised hindsight targets and outcome scores lie in [0, 1];
# un-normalised hindsight targets (mc.normalize: false) are r_t + gamma^(n-t) * z <= 2.
SOFT_LABEL_RANGE = (0.0, 2.0)
FLOAT32_MAX = 3.4028234663852886e38


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
    if isinstance(v, int) and v.bit_length() > 10_000:  # json.dumps refuses ints of over 4300 digits
        return f"<integer of {v.bit_length()} bits>"
    if isinstance(v, (bytes, bytearray)):
        return repr(bytes(v))
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "tolist"):
        return _json_safe(v.tolist())
    return v


def _ignore_labels(row: dict) -> int:
    """TRL's -100 step labels -> null (unlabelled); returns how many."""
    labels = row.get("labels")
    if not isinstance(labels, list):
        return 0
    hits = [i for i, x in enumerate(labels) if not isinstance(x, bool) and isinstance(x, (int, float)) and x == IGNORE_LABEL]
    if hits:
        row["labels"] = [None if i in hits else x for i, x in enumerate(labels)]
    return len(hits)


def _check_row_text(row: dict, fields: set[str]) -> None:
    """Every string of the row's contract fields is valid UTF-8 (one C-speed pass; the walk below
    finds the field only when something is wrong)."""
    try:
        json.dumps([row[k] for k in fields if k in row], ensure_ascii=False, default=repr).encode("utf-8")
        return
    except (UnicodeEncodeError, ValueError):
        pass
    for k in fields & row.keys():
        _check_text(row[k], k)


def _check_text(value: Any, path: str) -> None:
    """Strings must be valid UTF-8: the readers decode invalid bytes to lone surrogates (and JSON can
    spell one, "\\ud800"), which Arrow would refuse with a bare error at the end of the read."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(value[e.start])
            what = f"invalid byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
            raise _FieldError(path, f"not valid UTF-8: {what} at character {e.start}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}.{i}")


def _range_check(typ: pa.DataType):
    """A check that a value fits the Arrow type (raising _FieldError with the path below it), or None
    where nothing can overflow. A number the column cannot hold is a field error, not a bare
    ArrowInvalid at the end of the read, nor (float32) a silent inf."""
    if pa.types.is_integer(typ):
        bits = typ.bit_width
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if pa.types.is_signed_integer(typ) else (0, 2 ** bits - 1)

        def check(v):
            if isinstance(v, int) and not lo <= v <= hi:
                raise _FieldError("", f"{_short(v)} does not fit {typ} ({lo}..{hi})")
        return check
    if pa.types.is_float32(typ):
        def check(v):
            if isinstance(v, (int, float)) and abs(v) > FLOAT32_MAX:
                raise _FieldError("", f"{_short(v)} overflows float32 (largest {FLOAT32_MAX:.7g})")
        return check
    if pa.types.is_list(typ) and (inner := _range_check(typ.value_type)):
        def check(v):
            for i, x in enumerate(v if isinstance(v, list) else ()):
                if x is not None:
                    _under(inner, x, str(i))
        return check
    if pa.types.is_struct(typ) and (subs := [(f.name, c) for f in typ if (c := _range_check(f.type))]):
        def check(v):
            for name, c in subs if isinstance(v, dict) else ():
                if v.get(name) is not None:
                    _under(c, v[name], name)
        return check
    return None


def _under(check, value, key: str) -> None:
    try:
        check(value)
    except _FieldError as e:
        raise _FieldError(f"{key}.{e.field}" if e.field else key, e.message) from None


_RANGE_CHECKS: dict[str, list] = {}


def _check_storable(kind: str, rec: dict) -> None:
    if kind not in _RANGE_CHECKS:
        _RANGE_CHECKS[kind] = [(f.name, c) for f in schema_for(kind) if (c := _range_check(f.type))]
    for name, check in _RANGE_CHECKS[kind]:
        if rec.get(name) is not None:
            _under(check, rec[name], name)


def _check_labels(row: dict) -> None:
    """Soft step labels are training targets (MSE): a value outside their range is an error, not a target."""
    if row.get("label_kind") != "soft":
        return  # hard labels: 0 or 1, checked by the row model
    lo, hi = SOFT_LABEL_RANGE
    for i, x in enumerate(row.get("labels") or []):
        if x is not None and not lo <= x <= hi:
            raise _FieldError(f"labels.{i}", f"soft label {_short(x)} is outside [{lo:g}, {hi:g}]")


def validate_rows(
    kind: str,
    rows: Iterable[dict],
    source: str,
    *,
    defaults: dict | None = None,
    id_prefix: str | None = None,
    skip_bad_rows: bool = False,
    seen_ids: dict[str, tuple[str, int]] | None = None,
    counts: Counter | None = None,
) -> tuple[pa.Table, list[Rejected], set[str]]:
    """Validate rows against the kind's contract.

    Returns (table of good rows, rejected rows, ignored column names). Raises
    RecordError at the first bad row unless `skip_bad_rows`. `seen_ids` ({id: (source,
    row)}) carries ids across the files of one read, so a duplicate names both rows;
    `counts` collects what was read leniently (`ignore_labels`: TRL's -100 read as null).
    """
    model = ROW_MODELS[kind]
    schema = schema_for(kind)
    fields = set(model.model_fields)
    seen_ids = {} if seen_ids is None else seen_ids
    counts = Counter() if counts is None else counts
    good: list[dict] = []
    good_rows: list[int] = []
    rejected: list[Rejected] = []
    ignored: set[str] = set()
    for i, raw in enumerate(rows):
        try:
            ignore_labels = 0
            if isinstance(raw, UnparseableRow):
                raise _FieldError("<json>", f"not valid JSON: {raw.error}")
            if not isinstance(raw, dict):
                raise _FieldError("<row>", f"must be an object, got {type(raw).__name__}")
            row = normalise(kind, raw, defaults)
            if row.get("id") in (None, "") and "id" in fields:
                row["id"] = f"{id_prefix or 'row'}-{i}"
            if kind == "stepwise":
                ignore_labels = _ignore_labels(row)
            for key in ("labels", "outcome", "chosen_score", "rejected_score", "ref_chosen_logp", "ref_rejected_logp"):
                vals = row.get(key)
                for x in vals if isinstance(vals, list) else [vals]:
                    if isinstance(x, float) and not math.isfinite(x):
                        raise _FieldError(key, f"must be finite, got {x!r}")
            ignored.update(k for k in row if k not in fields)
            _check_row_text(row, fields)
            rec = model.model_validate(row).model_dump(exclude_none=False)
            _check_storable(kind, rec)
            _check_labels(rec)
            if "id" in rec:
                if rec["id"] in seen_ids:
                    first = seen_ids[rec["id"]]
                    raise _FieldError("id", f"duplicate id {rec['id']!r}: first at {first[0]} row {first[1]}")
                seen_ids[rec["id"]] = (source, i)
            good.append(rec)
            good_rows.append(i)
            counts["ignore_labels"] += ignore_labels
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
    table = _to_table(good, good_rows, schema, source)
    return table, rejected, ignored


def _to_table(good: list[dict], rows: list[int], schema: pa.Schema, source: str) -> pa.Table:
    """The good rows as a table. Rows were checked against the schema; should Arrow still refuse
    one, name that row rather than fail the whole read with a bare Arrow error."""
    try:
        return pa.Table.from_pylist(good, schema=schema)
    except (pa.ArrowException, UnicodeError, OverflowError, ValueError):
        for rec, i in zip(good, rows):
            try:
                pa.Table.from_pylist([rec], schema=schema)
            except (pa.ArrowException, UnicodeError, OverflowError, ValueError) as e:
                raise RecordError(source, i, "<row>", f"cannot be stored as {schema.names}: {e}") from None
        raise


def _short(v: Any, n: int = 80) -> str:
    if isinstance(v, int) and v.bit_length() > 200:  # repr of a huge int is slow, or refused past 4300 digits
        return f"<integer of {v.bit_length()} bits>"
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
