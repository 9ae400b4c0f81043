"""Ray Data readers: stream validated record shards to the stages.

Each shard is read and validated by one Ray Data task, so a bad row is still
reported with its file and row number, and shards are read in parallel across
the cluster. Quarantine files land in `quarantine_dir` (one per shard, rewritten
if the shard is read again, so counts never double). Ids are checked for duplicates
within each shard (shards are validated apart); `read_records` checks them across
files. Empty shards are found on the driver before the read (size, Parquet footer):
a warning each, an error when every shard is empty.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.data.io import _is_glob, list_shards, read_file, read_records
from pipeline.data.records import EmptyInput
from pipeline.data.schemas import schema_for

log = logging.getLogger(__name__)


class _ReadShard:
    def __init__(self, kind: str, defaults: dict | None, skip_bad_rows: bool, quarantine_dir: str | None, split: str):
        self.kind, self.defaults, self.skip, self.qdir, self.split = kind, defaults, skip_bad_rows, quarantine_dir, split

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            read_file(p, self.kind, defaults=self.defaults, skip_bad_rows=self.skip, quarantine_dir=self.qdir,
                      split=self.split)[0]
            for p in batch.column("path").to_pylist()
        ]
        return pa.concat_tables(tables) if tables else schema_for(self.kind).empty_table()


def read_dataset(
    paths: str | list[str],
    kind: str,
    *,
    defaults: dict | None = None,
    skip_bad_rows: bool = False,
    quarantine_dir: str | None = None,
    split: str = "train",
) -> ray.data.Dataset:
    """A lazy Ray Dataset of validated records behind `paths` (files, shard dirs, HF data sets)."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    files, hf = [], []
    for p in map(str, paths):
        if Path(p).exists() or _is_glob(p):
            files += list_shards(p)  # files, and save_to_disk folders (read by a task each, like files)
        else:
            hf.append(p)  # a hub name
    if files and not hf:
        _check_not_all_empty(files, kind)
    parts = []
    if files:
        items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        fn = _ReadShard(kind, defaults, skip_bad_rows, quarantine_dir, split)
        parts.append(items.map_batches(fn, batch_size=1, batch_format="pyarrow", zero_copy_batch=True))
    if hf:
        # Hugging Face data sets are read once on the driver, then handed to Ray Data.
        table, _ = read_records(hf, kind, defaults=defaults, skip_bad_rows=skip_bad_rows, quarantine_dir=quarantine_dir, split=split)
        parts.append(ray.data.from_arrow(table))
    if not parts:
        raise ValueError("read_dataset: no paths given")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def is_empty(path: str) -> bool:
    """Known empty without reading it: a zero-byte file, or Parquet with zero rows in its footer."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.stat().st_size == 0:
        return True
    if path.endswith(".parquet"):
        try:
            return pq.read_metadata(path).num_rows == 0
        except (pa.ArrowException, OSError):  # unreadable: the read task reports it, with the file's name
            return False
    return False


def _check_not_all_empty(files: list[str], kind: str) -> None:
    empty = [f for f in files if is_empty(f)]
    for f in empty:
        log.warning("%s: no rows", f)
    if len(empty) == len(files):
        raise EmptyInput(f"no {kind} rows: every shard is empty ({', '.join(files[:5])}{' ...' if len(files) > 5 else ''})")


def quarantine_count(quarantine_dir: str | None) -> int:
    """Rows quarantined so far under `quarantine_dir`."""
    if not quarantine_dir or not Path(quarantine_dir).is_dir():
        return 0
    return sum(sum(1 for line in f.open() if line.strip()) for f in Path(quarantine_dir).glob("*.quarantine.jsonl"))


def quarantine_rows(quarantine_dir: str) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(quarantine_dir).glob("*.quarantine.jsonl")) for line in f.open() if line.strip()]
