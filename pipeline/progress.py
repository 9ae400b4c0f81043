"""What a person reads while a long job runs: a console apart from the framework's log.

Any process of a job (the driver or a Ray worker) calls `report(task, done, total)`: one JSON line
appended to the file named by $MAHALO_PROGRESS_FILE (a no-op when unset). The main job sets the
variable before Ray starts (pipeline.runtime forwards it to the workers) and runs `console_job`:

- fds 1 and 2 of the driver, Python's sys.stdout / sys.stderr and the root logger go to a log file
  (Ray forwards its workers' output to the driver's stdout / stderr, so theirs lands there too);
- the terminal, kept as a dup of fd 1, gets `say()` lines (stage starts and ends), our own WARNING+
  records (pipeline.*, jobs.*) and one live progress line, redrawn by a thread that tails the
  progress file (on a terminal in place each second; elsewhere a new line at most every 30 s);
- an exception leaving the job prints its summary and the log's path on the terminal.

Workers on other nodes of a cluster write to their own disk: only the driver's node is seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

ENV = "MAHALO_PROGRESS_FILE"
OURS = ("pipeline", "jobs", "__main__")  # loggers whose warnings a person should see

log = logging.getLogger(__name__)
_warned: set[str] = set()
_active: "Console | None" = None


# -- the writing side: any process ------------------------------------------------------------------

def report(task: str, done: int, total: int) -> None:
    """`done` of `total` units of `task` are finished (cumulative). A no-op without $MAHALO_PROGRESS_FILE."""
    _append({"task": task, "done": int(done), "total": int(total), "t": time.time()}, task)


def advance(task: str, n: int, total: int) -> None:
    """`n` more units of `task` are finished: for work spread over processes (the engine actors of a Ray
    Data pool), whose increments the reader sums. A no-op without $MAHALO_PROGRESS_FILE."""
    _append({"task": task, "add": int(n), "total": int(total), "t": time.time()}, task)


def _append(rec: dict, task: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps(rec) + "\n"
    try:
        # O_APPEND and one write per line: lines from several processes do not interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:  # progress is a courtesy: it must not fail the work; said once per process
        if path not in _warned:
            _warned.add(path)
            log.warning("progress file %s (%s): %s; progress of %s is not shown", path, ENV, e, task)


def tracked(batches: Iterable, task: str, total: int, count: Callable[[object], int] = len) -> Iterator:
    """`batches`, unchanged, reporting the running sum of `count(batch)` against `total` after each."""
    done = 0
    for b in batches:
        done += count(b)
        report(task, done, total)
        yield b


# -- the reading side: pure formatting and state (unit-tested) ---------------------------------------

def fmt_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def text_bar(done: int, total: int, width: int = 20) -> str:
    frac = min(1.0, max(0.0, done / total)) if total > 0 else 0.0
    full = int(frac * width)
    return "[" + "#" * full + "-" * (width - full) + "]"


def progress_text(task: str, done: int, total: int, rate: float | None) -> str:
    """`sft 6/16 [#######-------------] 0.21/s ETA 48s` (rate and ETA once two reports are apart in time)."""
    out = f"{task} {done}/{total} {text_bar(done, total)}"
    if rate:
        out += f" {rate:.2f}/s" if rate < 10 else f" {rate:.0f}/s"
        if total > done:
            out += f" ETA {fmt_duration((total - done) / rate)}"
    return out


def read_new(path: str | Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` after byte `offset` -> (records, new offset). A partial last line
    (a writer mid-write) waits for the next call; a malformed one is logged and skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for raw in data[:end].splitlines():
        try:
            rec = json.loads(raw)
            n = {"add": int(rec["add"])} if "add" in rec else {"done": int(rec["done"])}
            records.append({"task": str(rec["task"]), **n, "total": int(rec["total"]), "t": float(rec["t"])})
        except (ValueError, KeyError, TypeError) as e:
            log.warning("progress file %s: a malformed line skipped (%s): %r", path, e, raw[:200])
    return records, offset + end


@dataclass
class _Task:
    total: int
    done: int
    t: float
    first_done: int
    first_t: float


@dataclass
class ProgressState:
    """The latest report of each task; the rate of each since its first report (a restart resets it)."""
    tasks: dict[str, _Task] = field(default_factory=dict)
    latest: str | None = None

    def feed(self, rec: dict) -> None:
        cur = self.tasks.get(rec["task"])
        if "add" in rec:  # an increment (advance): on top of what this task's increments made so far
            rec = {**rec, "done": rec["add"] + (cur.done if cur is not None and cur.total == rec["total"] else 0)}
        if cur is None or rec["done"] < cur.done or rec["total"] != cur.total:  # new, restarted or resized
            cur = self.tasks[rec["task"]] = _Task(rec["total"], rec["done"], rec["t"], rec["done"], rec["t"])
        cur.done, cur.t = rec["done"], rec["t"]
        self.latest = rec["task"]

    def text(self) -> str | None:
        """The most recently reported task as a progress line, or None."""
        if self.latest is None:
            return None
        c = self.tasks[self.latest]
        rate = (c.done - c.first_done) / (c.t - c.first_t) if c.t > c.first_t and c.done > c.first_done else None
        return progress_text(self.latest, c.done, c.total, rate)

    def reset(self) -> None:
        self.tasks.clear()
        self.latest = None


# -- the console ---------------------------------------------------------------------------------------

class Console:
    """The terminal: whole lines (`say`) and one live line (`begin`/`poll`/`end` of a stage).
    On a terminal the live line is redrawn in place; elsewhere it is printed as a line at most every
    `every_s` seconds, and only when there is news."""

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.state = ProgressState()
        self.stage: tuple[str, float, float | None] | None = None  # (label, started, expected seconds)
        self._lock = threading.RLock()
        self._drawn = False  # a live line is on screen (tty)
        self._printed_at = 0.0
        self._news = False

    def say(self, text: str) -> None:
        with self._lock:
            self._erase()
            self.stream.write(text + "\n")
            self._draw()
            self.stream.flush()

    def begin(self, label: str, expected_s: float | None) -> None:
        with self._lock:
            self.state.reset()
            self.stage = (label, self.clock(), expected_s)
            self._printed_at, self._news = self.clock(), False

    def end(self) -> None:
        with self._lock:
            self._erase()
            self.stage = None
            self.state.reset()
            self.stream.flush()

    def feed(self, records: list[dict]) -> None:
        with self._lock:
            # reports from before the running stage began (the last ones of the stage before, read late)
            # are that stage's, not this one's
            fresh = [r for r in records if self.stage is not None and r["t"] >= self.stage[1]]
            for r in fresh:
                self.state.feed(r)
            self._news = self._news or bool(fresh)

    def live_text(self) -> str | None:
        if self.stage is None:
            return None
        label, t0, expected = self.stage
        head = f"  {label} {fmt_duration(self.clock() - t0)}" + (f" of ~{fmt_duration(expected)}" if expected else "")
        body = self.state.text()
        return f"{head} | {body}" if body else head

    def poll(self) -> None:
        """Redraw (terminal) or print (elsewhere, when due and there is news) the live line."""
        with self._lock:
            if self.stage is None:
                return
            if self.tty:
                self._erase()
                self._draw()
            elif self._news and self.clock() - self._printed_at >= self.every_s:
                self.stream.write(self.live_text() + "\n")
                self._printed_at, self._news = self.clock(), False
            self.stream.flush()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def _draw(self) -> None:
        text = self.live_text() if self.tty else None
        if text:
            self.stream.write(text[:_width() - 1])
            self._drawn = True


def _width() -> int:
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 120


def active() -> Console | None:
    return _active


def say(text: str) -> None:
    """A line for the person running the job: the console when one is active, else stdout."""
    if _active is not None:
        _active.say(text)
    else:
        print(text, flush=True)


def summary(e: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line; a many-line message (a Ray task error's remote traceback) as its
    first and last lines, the last one naming the original error."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    msg = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""
    out = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def reported(e: BaseException) -> str | None:
    """The log file an exception's traceback went to, when `console_job` reported it."""
    return getattr(e, "_mahalo_log", None)


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console
        self.addFilter(_Ours())

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the message only: a traceback stays in the log file
            tail = " (traceback in the log)" if record.exc_info else ""
            self.console.say(f"{record.levelname} {record.name}: {record.getMessage()}{tail}")
        except Exception:
            self.handleError(record)


def _tail(console: Console, path: Path, stop: threading.Event, poll_s: float) -> None:
    offset = path.stat().st_size if path.exists() else 0
    while not stop.wait(poll_s):
        records, offset = read_new(path, offset)
        console.feed(records)
        console.poll()


@contextlib.contextmanager
def console_job(log_path: str | Path, progress_path: str | Path, name: str = "main", poll_s: float = 1.0,
                every_s: float = 30.0) -> Iterator[Console]:
    """The driver's output to `log_path`, a Console on the terminal, $MAHALO_PROGRESS_FILE set to
    `progress_path` (set it before Ray starts: workers inherit it); all restored on exit."""
    global _active
    # absolute: workers and this job's own code may change directory while the tail thread reads
    log_path, progress_path = Path(log_path).resolve(), Path(progress_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress_path.parent.mkdir(parents=True, exist_ok=True)
    progress_path.write_text("")  # this job's reports only
    for s in (sys.stdout, sys.stderr):
        s.flush()
    term = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    console = Console(term, every_s=every_s)
    logf = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved_fds = os.dup(1), os.dup(2)
    saved = sys.stdout, sys.stderr, os.environ.get(ENV), _active
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    fmt = next((h.formatter for h in saved_handlers if h.formatter), None) or logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    to_file = logging.StreamHandler(logf)
    to_file.setFormatter(fmt)
    stop = threading.Event()
    os.dup2(logf.fileno(), 1)  # C-level writes and child processes (Ray's) too
    os.dup2(logf.fileno(), 2)
    sys.stdout = sys.stderr = logf
    root.handlers = [to_file, _ConsoleHandler(console)]
    os.environ[ENV] = str(progress_path)  # workers run in other directories
    _active = console
    tail = threading.Thread(target=_tail, args=(console, progress_path, stop, poll_s), name="progress-tail",
                            daemon=True)
    tail.start()
    console.say(f"{name}: framework output and the full log: {log_path}")
    try:
        yield console
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # SystemExit: Ray's driver turns SIGTERM into one
        logf.write(f"{name}: failed\n" + "".join(traceback.format_exception(e)))
        console.end()
        what = ("interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped (exit {e.code})"
                if isinstance(e, SystemExit) else f"failed: {summary(e)}")
        console.say(f"{name}: {what}\n{name}: full log: {log_path}")
        with contextlib.suppress(AttributeError):
            e._mahalo_log = str(log_path)
        raise
    finally:
        stop.set()
        tail.join(timeout=5)
        _active = saved[3]
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = saved[0], saved[1]
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        root.handlers = saved_handlers
        if saved[2] is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved[2]
        logf.close()
        term.close()
