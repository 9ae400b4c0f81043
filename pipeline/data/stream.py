"""Ray Data readers: stream validated record shards to the stages.

Each shard is read and validated by one Ray Data task, so a bad row is still
reported with its file and row number, and shards are read in parallel across
the cluster. Quarantine files land in `quarantine_dir` (one per shard, rewritten
if the shard is read again, so counts never double).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import ray

from pipeline.data.io import _is_hf_saved, list_shards, read_file, read_records
from pipeline.data.schemas import schema_for


class _ReadShard:
    def __init__(self, kind: str, defaults: dict | None, skip_bad_rows: bool, quarantine_dir: str | None):
        self.kind, self.defaults, self.skip, self.qdir = kind, defaults, skip_bad_rows, quarantine_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            read_file(p, self.kind, defaults=self.defaults, skip_bad_rows=self.skip, quarantine_dir=self.qdir)[0]
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
        if Path(p).exists() and not _is_hf_saved(Path(p)):
            files += list_shards(p)
        else:
            hf.append(p)
    parts = []
    if files:
        items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        fn = _ReadShard(kind, defaults, skip_bad_rows, quarantine_dir)
        parts.append(items.map_batches(fn, batch_size=1, batch_format="pyarrow", zero_copy_batch=True))
    if hf:
        # Hugging Face data sets are read once on the driver, then handed to Ray Data.
        table, _ = read_records(hf, kind, defaults=defaults, skip_bad_rows=skip_bad_rows, quarantine_dir=quarantine_dir, split=split)
        parts.append(ray.data.from_arrow(table))
    if not parts:
        raise ValueError("read_dataset: no paths given")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def quarantine_count(quarantine_dir: str | None) -> int:
    """Rows quarantined so far under `quarantine_dir`."""
    if not quarantine_dir or not Path(quarantine_dir).is_dir():
        return 0
    return sum(sum(1 for line in f.open() if line.strip()) for f in Path(quarantine_dir).glob("*.quarantine.jsonl"))


def quarantine_rows(quarantine_dir: str) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(quarantine_dir).glob("*.quarantine.jsonl")) for line in f.open() if line.strip()]
