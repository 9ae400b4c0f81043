"""Shard-by-shard output with resume, for stages that map input shards to output shards.

A stage's Ray Data pipeline yields result rows that carry `_shard` (the output shard
they belong to), `_input` (the input row they came from) and `_error` (null, or why
that input failed). `write_by_shard` buffers rows per shard and writes a shard
atomically once every one of its inputs has come back; failed inputs go to
`<out_dir>/_failed/<shard>.jsonl`, counted. A killed run leaves only whole shards,
so the next run skips those and redoes the rest: no row is lost or written twice.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.io import _atomic_write_text, write_records
from pipeline.data.schemas import schema_for

META = ("_shard", "_input", "_error")


@dataclass
class ShardReport:
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    rows: int = 0
    failed_inputs: int = 0
    extra: dict = field(default_factory=dict)  # stage-specific counters (e.g. unparseable judge outputs)


def failed_count(out_dir: str | Path) -> int:
    """Inputs quarantined under `<out_dir>/_failed/` by this and earlier (resumed) runs."""
    return sum(len(f.read_text().splitlines()) for f in sorted(Path(out_dir).glob("_failed/*.jsonl")))


def pending(shards: dict[str, Path]) -> tuple[dict[str, Path], list[str]]:
    """(shards still to do, shards already written)."""
    done = [s for s, p in shards.items() if p.exists()]
    return {s: p for s, p in shards.items() if not p.exists()}, done


def write_by_shard(results: Iterable[pa.Table], expected: dict[str, int], out_paths: dict[str, Path], kind: str,
                   counters: tuple[str, ...] = (), progress=None) -> ShardReport:
    report = ShardReport()
    rows: dict[str, list[dict]] = defaultdict(list)
    failed: dict[str, list[dict]] = defaultdict(list)
    inputs: dict[str, set] = defaultdict(set)
    names = schema_for(kind).names
    written: set[str] = set()
    for batch in results:
        touched = []
        for r in batch.to_pylist():
            shard = r["_shard"]
            if shard in written:
                raise RuntimeError(f"shard {shard}: a result arrived after the shard was written")
            inputs[shard].add(r["_input"])
            touched.append(shard)
            for c in counters:
                report.extra[c] = report.extra.get(c, 0) + int(r.get(c) or 0)
            if r["_error"] is not None:
                failed[shard].append({"input": r["_input"], "error": r["_error"]})
            else:
                rows[shard].append({k: r[k] for k in names})
        # All results of one input arrive in the same batch, so a shard is whole when, at the
        # end of a batch, every one of its inputs has been seen.
        for shard in dict.fromkeys(touched):
            if len(inputs[shard]) == expected[shard]:
                out = out_paths[shard]
                write_records(rows.pop(shard, []), out, kind)
                if failed.get(shard):
                    f = out.parent / "_failed" / f"{out.stem}.jsonl"
                    _atomic_write_text(f, "".join(json.dumps(x) + "\n" for x in failed[shard]))
                    report.failed_inputs += len(failed.pop(shard))
                report.shards_written.append(str(out))
                report.rows += pq.read_metadata(out).num_rows
                written.add(shard)
                if progress is not None:
                    progress.update(1)
    missing = [s for s in expected if s not in written]
    if missing:
        raise RuntimeError(f"{len(missing)} shards got fewer results than inputs: {missing[:5]}")
    return report
