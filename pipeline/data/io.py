"""Read and write record files: Parquet, JSONL (or a JSON array), Hugging Face
data sets (a `save_to_disk` directory, a directory of Parquet/JSONL shards, or a
hub name where a hub is reachable).

Every read validates against the record contract. A bad row fails the read with
its file, row and field, or, with `skip_bad_rows`, goes to a quarantine file and
is counted. Every write is atomic (temporary file, then rename), so a killed job
never leaves a half-written shard. What happens to each kind of malformed input
is the table in docs/data.md.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.hashing import stable_digest
from pipeline.data.records import EmptyInput, Rejected, RecordError, UnparseableRow, UnsupportedFormat, validate_rows
from pipeline.data.schemas import schema_for

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUPPORTED = ("supported: .parquet, .jsonl, .json (a JSON array), .jsonl.gz, .json.gz, a directory of these, "
             "a glob matching them, a Hugging Face save_to_disk directory, or a hub data set name")
# Shard directories carry documentation (a data set downloaded from the hub) and job configs (every
# job writes its config.yaml into its out_dir) next to the shards: skipped and logged. Any other file
# that is not a shard is an error, never silently left out.
DOC_SUFFIXES = (".md", ".rst", ".yaml", ".yml")
DOC_NAMES = ("readme", "license", "licence", "notice", "citation", "changelog")
# Leading bytes of files that are no text: (magic, what it is). gzip is read whatever the file's name.
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
         (b"PK\x03\x04", "zip"), (b"PAR1", "Parquet"), (b"ARROW1", "Arrow"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


@dataclass
class ReadReport:
    rows: int = 0
    quarantined: int = 0
    quarantine_files: list[str] = field(default_factory=list)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    empty_files: list[str] = field(default_factory=list)  # files with no rows (warned)
    skipped_files: list[str] = field(default_factory=list)  # documentation / job configs next to shards (logged)
    ignore_labels: int = 0  # TRL's -100 step labels read as null (unlabelled)

    def merge(self, other: "ReadReport") -> None:
        self.rows += other.rows
        self.quarantined += other.quarantined
        self.quarantine_files += other.quarantine_files
        self.ignored_columns.update(other.ignored_columns)
        self.empty_files += other.empty_files
        self.skipped_files += other.skipped_files
        self.ignore_labels += other.ignore_labels


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[") and not Path(path).exists()


def _is_doc(f: Path) -> bool:
    return f.suffix.lower() in DOC_SUFFIXES or f.name.lower().split(".")[0] in DOC_NAMES


def _unsupported(path: str | Path) -> UnsupportedFormat:
    suffix = "".join(Path(path).suffixes[-2:]) or "no suffix"
    hint = " (CSV has no types for message or label lists: convert it to JSONL or Parquet)" \
        if str(path).lower().endswith((".csv", ".tsv", ".csv.gz")) else ""
    return UnsupportedFormat(f"{path}: unsupported format ({suffix}){hint}; {SUPPORTED}")


def _walk(d: Path, shards: list, docs: list, bad: list, visited: set) -> None:
    """Shards under `d`: data files, and save_to_disk folders as one shard each."""
    real = d.resolve()
    if real in visited:  # a symlink loop
        return
    visited.add(real)
    for f in sorted(d.iterdir()):
        # Names starting with "." or "_" are bookkeeping (plans, failures, quarantine), not data.
        if f.name.startswith((".", "_")) or ".quarantine." in f.name:
            continue
        if f.is_dir():
            if _is_hf_saved(f):
                shards.append(str(f))  # read with datasets.load_from_disk, not as its JSON/Arrow files
            else:
                _walk(f, shards, docs, bad, visited)
        elif f.name.endswith(DATA_SUFFIXES):
            shards.append(str(f))
        elif _is_doc(f):
            docs.append(str(f))
        else:
            bad.append(str(f))


def list_shards(path: str | os.PathLike, skipped: list | None = None) -> list[str]:
    """The shards a path stands for: a file, the shards under a directory (sorted; a save_to_disk
    folder is one shard), or the files a glob matches. Documentation and YAML config files in a directory
    are skipped and logged (appended to `skipped`); any other file that is no shard is an error."""
    p = Path(path)
    if _is_hf_saved(p):
        return [str(p)]
    if p.is_file():
        if not p.name.endswith(DATA_SUFFIXES):
            raise _unsupported(p)
        return [str(p)]
    if p.is_dir():
        shards: list[str] = []
        docs: list[str] = []
        bad: list[str] = []
        _walk(p, shards, docs, bad, set())
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise UnsupportedFormat(f"{p}: holds {len(bad)} file(s) that are not shards: {', '.join(bad[:5])}{more}; "
                                    f"{SUPPORTED}. Move them out, or prefix their names with '_' to mark them "
                                    "as bookkeeping")
        if docs:
            log.info("%s: skipping %d documentation/config file(s): %s", p, len(docs), ", ".join(Path(d).name for d in docs))
            if skipped is not None:
                skipped += docs
        if not shards:
            raise FileNotFoundError(f"{p}: directory holds no shards; {SUPPORTED}")
        return shards
    if _is_glob(str(p)):
        matches = sorted(glob.glob(str(p), recursive=True))
        if not matches:
            raise FileNotFoundError(f"{p}: the pattern matches no file")
        return [s for m in matches for s in list_shards(m, skipped)]
    raise FileNotFoundError(f"{p}: no such file or directory")


def _open_text_lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes; gzip content is read whatever the file's name, other binary
    content is an error naming what it is."""
    with open(path, "rb") as f:
        head = f.read(8)
    kind = next((name for magic, name in MAGIC if head.startswith(magic)), None)
    if kind not in (None, "gzip"):
        raise RecordError(path, 0, "<file>", f"is {kind} content, not JSON text; {SUPPORTED}")
    with (gzip.open if kind == "gzip" else open)(path, "rb") as f:
        yield from f


def _decode(line: bytes) -> str:
    # Invalid bytes become lone surrogates (U+DC80..U+DCFF) and fail the row's string check with the
    # field's name, instead of a bare UnicodeDecodeError ending the whole read.
    return line.decode("utf-8", errors="surrogateescape")


def _raw_rows_file(path: str) -> Iterator[Any]:
    """Rows of one file as Python objects; a JSONL line that is not JSON is a bad row."""
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise RecordError(path, 0, "<file>", f"not a readable Parquet file: {e}") from None
        yield from table.to_pylist()
        return
    n = 0
    try:
        for row in _text_rows(path):
            yield row
            n += 1
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated gzip stream
        raise RecordError(path, n, "<file>", f"cannot be read past its first {n} rows: {e}") from None


def _text_rows(path: str) -> Iterator[Any]:
    lines = _open_text_lines(path)
    first = True
    for raw in lines:
        line = _decode(raw)
        if first:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            first = False
            if line.lstrip().startswith("["):  # a JSON array file (the paper's released format)
                text = line + "".join(_decode(x) for x in lines)
                try:
                    data = json.loads(text)
                except (ValueError, RecursionError) as e:
                    raise RecordError(path, 0, "<file>", f"not valid JSON: {e}") from None
                yield from data if isinstance(data, list) else [data]
                return
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, ints over 4300 digits, deep nesting
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
    # Named by the shard and a digest of its full path: same-named shards of different folders get
    # their own files, and reading the same shard again rewrites its file (counts never double).
    stem = Path(source).name.replace("/", "_")
    out = qdir / f"{stem}.{stable_digest(os.path.abspath(source), 8)}.quarantine.jsonl"
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
    seen_ids: dict | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read and validate one file (or a Hugging Face data set given as `path`). `seen_ids` carries
    ids across the files of one read (duplicates are bad rows)."""
    if rows is not None:
        raw, source = rows, path
    elif Path(path).is_file():
        if not path.endswith(DATA_SUFFIXES):
            raise _unsupported(path)
        raw, source = _raw_rows_file(path), path
    else:
        raw, source = _load_hf(path, split)
    counts: Counter = Counter()
    table, rejected, ignored = validate_rows(
        kind, raw, source, defaults=defaults, id_prefix=_stem(source), skip_bad_rows=skip_bad_rows,
        seen_ids=seen_ids, counts=counts,
    )
    report = ReadReport(rows=table.num_rows, ignore_labels=counts["ignore_labels"])
    if ignored:
        report.ignored_columns[source] = sorted(ignored)
        log.warning("%s: ignoring columns not in the %s contract: %s", source, kind, ", ".join(sorted(ignored)))
    if rejected:
        qfile = _quarantine(rejected, quarantine_dir, source)
        report.quarantined, report.quarantine_files = len(rejected), [qfile]
        log.warning("%s: %d bad rows quarantined in %s", source, len(rejected), qfile)
    if report.ignore_labels:
        log.warning("%s: %d step labels of -100 (TRL's ignore index) read as unlabelled (null)", source, report.ignore_labels)
    if table.num_rows == 0 and not rejected:
        report.empty_files.append(source)
        log.warning("%s: no rows", source)
    return table, report


def _stem(source: str) -> str:
    """The file name without its data suffix (`pairs.jsonl.gz` -> `pairs`): the prefix of generated ids."""
    name = Path(source).name
    return next((name[: -len(x)] for x in DATA_SUFFIXES if name.endswith(x)), Path(source).stem)


def read_records(
    paths: str | list[str],
    kind: str,
    *,
    defaults: dict | None = None,
    skip_bad_rows: bool = False,
    quarantine_dir: str | None = None,
    split: str = "train",
    allow_empty: bool = False,
) -> tuple[pa.Table, ReadReport]:
    """Read every shard behind `paths` into one validated table. Ids are unique across all of them.
    No rows at all is an EmptyInput error unless `allow_empty`."""
    tables, report, seen = [], ReadReport(), {}
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = str(p)
        files = list_shards(p, report.skipped_files) if Path(p).exists() or _is_glob(p) else [p]  # else a hub name
        for f in files:
            t, r = read_file(f, kind, defaults=defaults, skip_bad_rows=skip_bad_rows, quarantine_dir=quarantine_dir,
                             split=split, seen_ids=seen)
            tables.append(t)
            report.merge(r)
    if report.rows == 0 and not allow_empty:
        why = f"all {report.quarantined} rows were quarantined ({', '.join(report.quarantine_files)})" \
            if report.quarantined else "every file is empty"
        raise EmptyInput(f"{paths}: no {kind} rows: {why}")
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
