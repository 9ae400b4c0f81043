"""Stage bookkeeping for multi-stage jobs: each finished stage leaves a marker
(`<run_dir>/stages/<name>.json`, written atomically, with its outputs, its time and its
fingerprint), so a job run again resumes after the last finished stage.

The fingerprint hashes the settings the stage reads (`config`) and the fingerprints of the
stages whose results it reads (`inputs`). A rerun with the same fingerprint skips the stage; a
changed one logs the changed keys (dotted names) or the redone inputs, moves the stage's old
marker and outputs aside into `<run_dir>/previous/<name>-<time>/` (so no cache, plan, shard or
Ray Train checkpoint of the old settings is resumed) and redoes it. Because a stage's
fingerprint holds its inputs', every stage after a redone one is redone too. A stage
interrupted under other settings (started, never finished) is cleared the same way.

Given the job's stage list (`plan`) and expected seconds per stage, each start and end is one
line, `stage 3/13 sft: done in 164 s (expected 161 s); job ETA 18:58`: in the log, and on the
console of pipeline.progress.console_job when the job runs one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline import progress
from pipeline.data.hashing import stable_digest

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """JSON values only (pydantic models dumped, paths as strings), so the hash is stable across runs."""
    def default(o):
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        if isinstance(o, (Path, os.PathLike)):
            return os.fspath(o)
        raise TypeError(f"stage config value {o!r} ({type(o).__name__}) is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "(config)": value}


def changed_keys(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs; '<absent>' for a missing one."""
    a, b = _flatten(old), _flatten(new)
    pairs = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))}
    return {k: (x, y) for k, (x, y) in pairs.items() if x != y}


class StageRunner:
    def __init__(self, run_dir: str | Path, plan: Iterable[str] = (), expected: dict[str, float] | None = None):
        """plan: the job's stage names in order (for "stage i/N" and the job's ETA).
        expected: seconds per stage (config); a previous run's marker's `seconds` wins over it."""
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}  # of the stages run (or skipped) in this job, by name
        self.plan = list(plan)
        self.expected = expected_seconds(self.dir, self.plan, expected or {})
        unknown = sorted(set(expected or {}) - set(self.plan))
        if self.plan and unknown:  # a misspelt stage would otherwise never count
            log.warning("expected_seconds: %s are not stages of this job %s; ignored", unknown, self.plan)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], config: Any = None, inputs: Iterable[str] = (),
            outputs: Iterable[str | Path] = ()) -> dict[str, Any]:
        """Run `fn` unless `name` already finished with the same fingerprint; returns its outputs either way.

        config: the settings the stage reads (JSON-able; pydantic models are dumped).
        inputs: the names of the earlier stages whose results it reads (run before it in this job).
        outputs: the files/directories it writes; moved aside before a redo so stale ones do not leak in."""
        record = self._record(name, config, inputs)
        marker, started = self.dir / f"{name}.json", self.dir / f"{name}.started"
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("fingerprint") == record["fingerprint"]:
                return self._skip(name, done)
            if "fingerprint" not in done:  # written before fingerprints: nothing to compare, adopt it
                log.warning("stage %s: its marker has no fingerprint (an older run); kept as done, fingerprint "
                            "recorded now", name)
                self._write(marker, {**done, **record})
                return self._skip(name, done)
            aside = self._move_aside(name, [marker, *outputs])
            log.warning("stage %s: %s; redoing it (and the stages after it); the previous outputs are in %s",
                        name, self._why(done, record), aside)
        elif started.exists():
            before = json.loads(started.read_text())
            if before.get("fingerprint") != record["fingerprint"]:
                aside = self._move_aside(name, [started, *outputs])
                log.warning("stage %s: interrupted earlier under other settings (%s); starting over, its partial "
                            "outputs are in %s", name, self._why(before, record), aside)
        self._write(started, record)  # an interrupted stage resumes its partial outputs only under these settings
        t0 = time.time()
        expected = self.expected.get(name)
        self._say(f"{self._label(name)}: started" + (f", expected {expected:.0f} s" if expected is not None else "")
                  + self._eta(name, 0.0, t0))
        console = progress.active()
        if console is not None:
            console.begin(name, expected)
        try:
            outputs_ = fn() or {}
        except BaseException:
            self._end(console)
            self._say(f"{self._label(name)}: FAILED after {time.time() - t0:.0f} s")
            raise
        self._end(console)
        seconds = time.time() - t0
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write(marker, {"outputs": outputs_, "seconds": seconds, "finished": finished, **record})
        started.unlink(missing_ok=True)
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self._say(f"{self._label(name)}: done in {seconds:.0f} s"
                  + (f" (expected {expected:.0f} s)" if expected is not None else "") + self._eta(name, None, time.time()))
        return outputs_

    def _label(self, name: str) -> str:
        """`stage 3/13 sft`; a stage outside the plan joins it at the end (a job that did not list it)."""
        if not self.plan:
            return f"stage {name}"
        if name not in self.plan:
            log.warning("stage %s is not in the job's stage list %s; counted at its end", name, self.plan)
            self.plan.append(name)
        return f"stage {self.plan.index(name) + 1}/{len(self.plan)} {name}"

    def _eta(self, name: str, elapsed: float | None, now: float) -> str:
        """`; job ETA 18:58` from the expected seconds of this stage (elapsed None: finished) and the ones
        after it; `>=` when a later stage has no expected time; '' for the last stage or without a plan."""
        if name not in self.plan:
            return ""
        later = self.plan[self.plan.index(name) + (0 if elapsed is not None else 1):]
        if not later:
            return ""
        eta = job_eta(later, self.expected, elapsed or 0.0, now)
        return f"; job ETA {eta}" if eta else ""

    @staticmethod
    def _say(line: str) -> None:
        """To the log always; to the console too when the job has one (pipeline.progress.console_job)."""
        log.info("%s", line)
        if progress.active() is not None:
            progress.say(time.strftime("[%H:%M:%S] ") + line)

    @staticmethod
    def _end(console) -> None:
        if console is not None:
            console.end()

    def _record(self, name: str, config: Any, inputs: Iterable[str]) -> dict:
        missing = [i for i in inputs if i not in self.fingerprints]
        if missing:
            raise ValueError(f"stage {name}: its input stage(s) {missing} have not run in this job; run them first "
                             f"(run so far: {list(self.fingerprints)})")
        record = {"config": _plain(config), "inputs": {i: self.fingerprints[i] for i in inputs}}
        fp = stable_digest(json.dumps(record, sort_keys=True, separators=(",", ":")))
        self.fingerprints[name] = fp
        return {"fingerprint": fp, **record}

    def _skip(self, name: str, done: dict) -> dict:
        self.timings[name] = {"seconds": done["seconds"], "skipped": True}
        self._say(f"{self._label(name)}: already done ({done['seconds']:.0f} s), skipped")
        return done["outputs"]

    @staticmethod
    def _why(old: dict, new: dict) -> str:
        """What differs: the changed config keys with old -> new values, and the inputs redone."""
        parts = []
        keys = changed_keys(old.get("config"), new["config"])
        if keys:
            parts.append("changed settings: " + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in keys.items()))
        redone = sorted(k for k in set(old.get("inputs", {})) | set(new["inputs"])
                        if old.get("inputs", {}).get(k) != new["inputs"].get(k))
        if redone:
            parts.append("input stage(s) redone or changed: " + ", ".join(redone))
        return "; ".join(parts) or "fingerprint changed"

    def _move_aside(self, name: str, paths: list[str | Path]) -> Path:
        """Each existing path into <run_dir>/previous/<name>-<time>/, under its path relative to run_dir."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.run_dir / "previous" / f"{name}-{stamp}"
        n = 1
        while dest.exists():  # two redos within one second
            n += 1
            dest = self.run_dir / "previous" / f"{name}-{stamp}-{n}"
        root = self.run_dir.resolve()
        for p in map(Path, paths):
            if not p.exists():
                continue
            rp = p.resolve()
            rel = rp.relative_to(root) if rp.is_relative_to(root) else Path(rp.name)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(dest / rel))
        return dest

    @staticmethod
    def _write(path: Path, data: dict) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, default=str, indent=1))
        os.replace(tmp, path)


def expected_seconds(stages_dir: Path, names: Iterable[str], configured: dict[str, float]) -> dict[str, float]:
    """Expected seconds per stage: a previous run's marker (`<stages_dir>/<name>.json`, its `seconds`), else
    the configured value; a stage with neither is absent."""
    out = {k: float(v) for k, v in configured.items()}
    for name in names:
        marker = stages_dir / f"{name}.json"
        if marker.exists():
            try:
                out[name] = float(json.loads(marker.read_text())["seconds"])
            except (ValueError, KeyError, TypeError) as e:
                log.warning("stage marker %s: no usable `seconds` (%s); its expected time is the configured one",
                            marker, e)
    return out


def job_eta(remaining: list[str], expected: dict[str, float], elapsed: float, now: float) -> str:
    """The clock time the job should end: now + what is left of remaining[0] (already `elapsed` s in) + the
    rest. `>=HH:MM` when a stage has no expected time; '' when none has one."""
    known = [n for n in remaining if n in expected]
    if not known:
        return ""
    left = sum(expected[n] for n in known) - (min(elapsed, expected[remaining[0]]) if remaining[0] in expected else 0)
    return (">=" if len(known) < len(remaining) else "") + time.strftime("%H:%M", time.localtime(now + left))


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
