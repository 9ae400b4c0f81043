"""Read and write record files: Parquet, JSONL (or a JSON array), Hugging Face
data sets (a `save_to_disk` directory, a directory of Parquet/JSONL shards, or a
hub name where a hub is reachable).

Every read validates against the record contract. A bad row fails the read with
its file, row and field, or, with `skip_bad_rows`, goes to a quarantine file and
is counted. Every write is atomic (temporary file, then rename), so a killed job
never leaves a half-written shard.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.records import Rejected, RecordError, UnparseableRow, validate_rows
from pipeline.data.schemas import schema_for

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class ReadReport:
    rows: int = 0
    quarantined: int = 0
    quarantine_files: list[str] = field(default_factory=list)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)

    def merge(self, other: "ReadReport") -> None:
        self.rows += other.rows
        self.quarantined += other.quarantined
        self.quarantine_files += other.quarantine_files
        self.ignored_columns.update(other.ignored_columns)


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def list_shards(path: str | os.PathLike) -> list[str]:
    """The data files a path stands for: itself, or the shards under a directory, sorted."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        # Files or folders named "_..." or "..." are bookkeeping (plans, failures, quarantine), not data.
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file()
                       and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
                       and ".quarantine." not in f.name)
        if not files:
            raise FileNotFoundError(f"{p}: directory holds no .parquet/.jsonl/.json shards")
        return files
    raise FileNotFoundError(f"{p}: no such file or directory")


def _raw_rows_file(path: str) -> Iterator[Any]:
    """Rows of one file as Python objects; a JSONL line that is not JSON is a bad row."""
    if path.endswith(".parquet"):
        yield from pq.read_table(path).to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON array file (the paper's released format)
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(path, 0, "<file>", f"not valid JSON: {e}") from None
            yield from data
            return
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield UnparseableRow(line.rstrip("\n"), str(e))


def _load_hf(path: str, split: str) -> tuple[list[dict], str]:
    import datasets

    p = Path(path)
    if _is_hf_saved(p):
        ds = datasets.load_from_disk(str(p))
        src = str(p)
    elif path.endswith(DATA_SUFFIXES) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such file or directory")
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"{path}: not a local file or directory, and HF_HUB_OFFLINE=1 forbids loading it from the hub"
            )
        ds = datasets.load_dataset(path)
        src = f"hf://{path}"
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
        src = f"{src}[{split}]"
    return ds.to_list(), src


def _quarantine(rejected: list[Rejected], quarantine_dir: str | None, source: str) -> str:
    qdir = Path(quarantine_dir or Path(source).parent / "_quarantine")
    qdir.mkdir(parents=True, exist_ok=True)
    stem = Path(source).name.replace("/", "_")
    out = qdir / f"{stem}.quarantine.jsonl"
    lines = [json.dumps({"source": r.source, "row": r.row, "field": r.field, "error": r.error, "record": r.record}) for r in rejected]
    _atomic_write_text(out, "\n".join(lines) + "\n")
    return str(out)


def read_file(
    path: str,
    kind: str,
    *,
    defaults: dict | None = None,
    skip_bad_rows: bool = False,
    quarantine_dir: str | None = None,
    split: str = "train",
    rows: list[dict] | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read and validate one file (or a Hugging Face data set given as `path`)."""
    if rows is not None:
        raw, source = rows, path
    elif path.endswith(DATA_SUFFIXES) and Path(path).is_file():
        raw, source = _raw_rows_file(path), path
    else:
        raw, source = _load_hf(path, split)
    table, rejected, ignored = validate_rows(
        kind, raw, source, defaults=defaults, id_prefix=Path(source).stem, skip_bad_rows=skip_bad_rows
    )
    report = ReadReport(rows=table.num_rows)
    if ignored:
        report.ignored_columns[source] = sorted(ignored)
        log.warning("%s: ignoring columns not in the %s contract: %s", source, kind, ", ".join(sorted(ignored)))
    if rejected:
        qfile = _quarantine(rejected, quarantine_dir, source)
        report.quarantined, report.quarantine_files = len(rejected), [qfile]
        log.warning("%s: %d bad rows quarantined in %s", source, len(rejected), qfile)
    return table, report


def read_records(
    paths: str | list[str],
    kind: str,
    *,
    defaults: dict | None = None,
    skip_bad_rows: bool = False,
    quarantine_dir: str | None = None,
    split: str = "train",
) -> tuple[pa.Table, ReadReport]:
    """Read every shard behind `paths` into one validated table."""
    tables, report = [], ReadReport()
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = str(p)
        files = [p] if (not Path(p).exists() or _is_hf_saved(Path(p))) else list_shards(p)
        for f in files:
            t, r = read_file(f, kind, defaults=defaults, skip_bad_rows=skip_bad_rows, quarantine_dir=quarantine_dir, split=split)
            tables.append(t)
            report.merge(r)
    if not tables:
        return schema_for(kind).empty_table(), report
    return pa.concat_tables(tables), report


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_records(records: pa.Table | list[dict], path: str | os.PathLike, kind: str) -> str:
    """Validate and write records atomically as Parquet or JSONL (by suffix)."""
    path = Path(path)
    if isinstance(records, pa.Table):
        table = records.select(schema_for(kind).names).cast(schema_for(kind))
        table, _, _ = validate_rows(kind, table.to_pylist(), str(path))  # same contract on the way out
    else:
        table, _, _ = validate_rows(kind, records, str(path), id_prefix=path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    elif path.suffix in (".jsonl", ".json"):
        _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist()))
    else:
        raise ValueError(f"{path}: unknown format; use .parquet or .jsonl")
    return str(path)


def load_raw_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a file (Parquet / JSONL / JSON array) or a Hugging Face data set (saved or by hub name),
    as they are: for converters of public formats (pipeline.data.converters)."""
    p = Path(path)
    if p.is_file():
        return list(_raw_rows_file(str(p)))
    return _load_hf(path, split)[0]
