"""Stage bookkeeping for multi-stage jobs: each finished stage leaves a marker
(`<run_dir>/stages/<name>.json`, written atomically, with its outputs and its
time), so a job run again resumes after the last finished stage."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `fn` unless `name` already finished; returns its outputs either way."""
        marker = self.dir / f"{name}.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            self.timings[name] = {"seconds": done["seconds"], "skipped": True}
            log.info("stage %s: already done (%.0f s), skipping", name, done["seconds"])
            return done["outputs"]
        log.info("stage %s: starting", name)
        t0 = time.time()
        outputs = fn() or {}
        seconds = time.time() - t0
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"outputs": outputs, "seconds": seconds}, default=str, indent=1))
        os.replace(tmp, marker)
        self.timings[name] = {"seconds": seconds, "skipped": False}
        log.info("stage %s: done in %.0f s", name, seconds)
        return outputs


def write_report(run_dir: str | Path, timings: dict[str, dict], sections: dict[str, str]) -> Path:
    """`<run_dir>/report.md`: time per stage, then one section per stage result."""
    lines = ["# Run report", "", f"Run directory: `{Path(run_dir).resolve()}`; resolved config: `config.yaml`.",
             "", "## Time per stage", "", "| stage | seconds | note |", "|---|---:|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t['seconds']:.0f} | {'resumed (done earlier)' if t['skipped'] else ''} |")
    for title, body in sections.items():
        lines += ["", f"## {title}", "", body]
    out = Path(run_dir) / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
