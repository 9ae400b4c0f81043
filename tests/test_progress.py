"""The main job's console (pipeline/progress.py) and the stage lines with their ETA (pipeline/stages.py).
No Ray: the progress file protocol, the formatting, the fd redirection and StageRunner's lines."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import progress
from pipeline.progress import Console, ProgressState, console_job, fmt_duration, progress_text, read_new, text_bar
from pipeline.stages import StageRunner, expected_seconds, job_eta


def test_report_is_a_no_op_without_the_variable_and_appends_json_lines_with_it(tmp_path, monkeypatch):
    f = tmp_path / "p.jsonl"
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report("x", 1, 2)
    assert not f.exists()
    monkeypatch.setenv(progress.ENV, str(f))
    progress.report("train steps", 1, 4)
    # another process (a Ray worker inherits the variable the same way) appends to the same file
    subprocess.run([sys.executable, "-c", "from pipeline import progress; progress.report('eval points', 3, 24)"],
                   check=True, env=os.environ.copy())
    recs, off = read_new(f, 0)
    assert [(r["task"], r["done"], r["total"]) for r in recs] == [("train steps", 1, 4), ("eval points", 3, 24)]
    assert off == f.stat().st_size and read_new(f, off) == ([], off)


def test_read_new_waits_for_a_partial_line_and_names_a_malformed_one(tmp_path, caplog):
    f = tmp_path / "p.jsonl"
    f.write_text('{"task": "a", "done": 1, "total": 3, "t": 1.0}\nnot json\n{"task": "a", "done": 2')
    with caplog.at_level(logging.WARNING, logger="pipeline.progress"):
        recs, off = read_new(f, 0)
    assert [r["done"] for r in recs] == [1] and "malformed" in caplog.text and str(f) in caplog.text
    with open(f, "a") as h:  # the writer finishes its line
        h.write(', "total": 3, "t": 2.0}\n')
    recs, _ = read_new(f, off)
    assert [r["done"] for r in recs] == [2]


def test_tracked_reports_the_running_count_and_passes_batches_through(tmp_path, monkeypatch):
    f = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(f))
    assert list(progress.tracked([[1, 2], [3], [4, 5, 6]], "rows", 6)) == [[1, 2], [3], [4, 5, 6]]
    assert [r["done"] for r in read_new(f, 0)[0]] == [2, 3, 6]


def test_formatting():
    assert [fmt_duration(s) for s in (0, 42.4, 61, 3600 + 120 + 5)] == ["0s", "42s", "1m01s", "1h02m"]
    assert text_bar(5, 10, width=10) == "[#####-----]" and text_bar(3, 0, width=4) == "[----]"
    assert text_bar(12, 10, width=4) == "[####]"
    assert progress_text("sft steps", 4, 16, None) == "sft steps 4/16 [#####---------------]"
    assert progress_text("sft steps", 4, 16, 0.5) == "sft steps 4/16 [#####---------------] 0.50/s ETA 24s"
    assert progress_text("x", 16, 16, 0.5).endswith("0.50/s")  # nothing left: no ETA


def test_state_rate_comes_from_the_reports_times_and_a_restart_resets_it():
    st = ProgressState()
    st.feed({"task": "eval points", "done": 1, "total": 11, "t": 100.0})
    assert st.text() == "eval points 1/11 [#-------------------]"  # one report: no rate yet
    st.feed({"task": "eval points", "done": 5, "total": 11, "t": 108.0})
    assert st.text().endswith("0.50/s ETA 12s")
    st.feed({"task": "policy-mahdpo steps", "done": 1, "total": 4, "t": 109.0})
    assert st.text().startswith("policy-mahdpo steps 1/4")  # the latest task is shown
    st.feed({"task": "eval points", "done": 1, "total": 11, "t": 200.0})  # the same task from the start again
    st.feed({"task": "eval points", "done": 3, "total": 11, "t": 204.0})
    assert st.text().endswith("0.50/s ETA 16s")


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_console_off_a_terminal_prints_progress_at_most_every_30_s_and_only_news():
    out, clock = io.StringIO(), _Clock()
    c = Console(out, tty=False, clock=clock)
    c.begin("eval", 300.0)
    c.feed([{"task": "eval points", "done": 1, "total": 10, "t": 1000.0}])
    clock.t += 10
    c.poll()
    assert out.getvalue() == ""  # not yet 30 s
    clock.t += 25
    c.poll()
    assert out.getvalue() == "  eval 35s of ~5m00s | eval points 1/10 [##------------------]\n"
    clock.t += 60
    c.poll()  # no new report: nothing printed
    assert out.getvalue().count("\n") == 1
    c.say("stage 2/2 eval: done")
    c.end()
    assert out.getvalue().endswith("stage 2/2 eval: done\n") and "\r" not in out.getvalue()
    # the next stage: a report of the one before, read late, is not shown as this stage's
    c.begin("serve", None)
    c.feed([{"task": "eval points", "done": 10, "total": 10, "t": 1094.0}])
    assert c.live_text() == "  serve 0s"


def test_console_on_a_terminal_redraws_one_line_and_erases_it_around_whole_lines():
    out, clock = io.StringIO(), _Clock()
    c = Console(out, tty=True, clock=clock)
    c.begin("sft", None)
    clock.t += 5
    c.poll()
    assert out.getvalue() == "  sft 5s"
    c.say("WARNING pipeline.x: careful")
    assert out.getvalue() == "  sft 5s\r\x1b[KWARNING pipeline.x: careful\n  sft 5s"
    c.end()
    assert out.getvalue().endswith("\r\x1b[K")


def test_job_eta_counts_the_rest_of_this_stage_and_the_later_ones():
    now = time.mktime((2026, 12, 1, 18, 0, 0, 0, 0, -1))
    exp = {"a": 120.0, "b": 600.0}
    assert job_eta(["a", "b"], exp, 0.0, now) == "18:12"
    assert job_eta(["a", "b"], exp, 60.0, now) == "18:11"  # a minute into a
    assert job_eta(["a", "b"], exp, 500.0, now) == "18:10"  # a overran: no negative remainder
    assert job_eta(["a", "c", "b"], exp, 0.0, now) == ">=18:12"  # c: no expected time
    assert job_eta(["c"], exp, 0.0, now) == ""


def test_a_previous_runs_marker_seconds_win_over_the_configured_ones(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"seconds": 42.0}))
    (tmp_path / "b.json").write_text(json.dumps({"outputs": {}}))  # no seconds: the configured value stays
    assert expected_seconds(tmp_path, ["a", "b", "c"], {"a": 100, "b": 7}) == {"a": 42.0, "b": 7.0}


def test_main_job_console_gets_stage_lines_and_warnings_the_log_gets_the_noise(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)  # the root logger's level, as jobs.common.setup_logging sets it
    run = tmp_path / "run"
    log_file = run / "logs" / "main.log"
    with console_job(log_file, run / "logs" / "progress.jsonl", poll_s=0.05):
        assert os.environ[progress.ENV] == str(run / "logs" / "progress.jsonl")
        stages = StageRunner(run, plan=["a", "b"], expected={"a": 5, "b": 100})
        stages.run("a", lambda: print("python noise") or {"x": 1})
        os.write(2, b"C-level noise\n")
        subprocess.run(["echo", "child noise"], check=True)  # a child process (Ray's) inherits the log file
        logging.getLogger("pipeline.foo").info("info of ours")
        logging.getLogger("pipeline.foo").warning("warning of ours")
        # a framework's warning (a stand-in name: once Ray has set up its loggers in this process, "ray.*"
        # records no longer reach the root logger, and Ray's own handler writes to fd 2, the log, in a real job)
        logging.getLogger("somelib.sub").warning("warning of Ray's")
        stages.run("b", lambda: {})
        progress.say("main: done. Report: r.md")
    console = capfd.readouterr().out
    lines = console.splitlines()
    assert lines[0] == f"main: framework output and the full log: {log_file}"
    assert "] stage 1/2 a: started, expected 5 s; job ETA " in lines[1]
    assert "] stage 1/2 a: done in 0 s (expected 5 s); job ETA " in lines[2]
    assert lines[3] == "WARNING pipeline.foo: warning of ours"
    assert "] stage 2/2 b: started, expected 100 s; job ETA " in lines[4]
    assert "] stage 2/2 b: done in 0 s (expected 100 s)" in lines[5] and "ETA" not in lines[5]  # the last stage
    assert lines[6:] == ["main: done. Report: r.md"]
    log = log_file.read_text()
    for noise in ("python noise", "C-level noise", "child noise", "info of ours", "warning of Ray's"):
        assert noise in log and noise not in console
    assert "stage 1/2 a: started" in log  # the stage lines are in the log too
    assert progress.ENV not in os.environ and progress.active() is None
    print("after")  # stdout is the terminal again
    assert capfd.readouterr().out == "after\n"
    # run again: the finished stages are skipped, one line each
    with console_job(log_file, run / "logs" / "progress.jsonl"):
        StageRunner(run, plan=["a", "b"]).run("a", lambda: {})
    assert "] stage 1/2 a: already done (0 s), skipped" in capfd.readouterr().out


def test_a_failing_stage_prints_its_summary_and_the_log_path_with_the_traceback_in_the_log(tmp_path, capfd):
    run = tmp_path / "run"
    log_file = run / "logs" / "main.log"

    def boom():
        raise ValueError("rollout: problem p1 has no prompt\n  (details)\nValueError: the last line names it")

    with pytest.raises(ValueError) as info:
        with console_job(log_file, run / "logs" / "progress.jsonl"):
            StageRunner(run, plan=["a"]).run("a", boom)
    console = capfd.readouterr().out
    assert "] stage 1/1 a: FAILED after 0 s" in console
    assert ("main: failed: ValueError: rollout: problem p1 has no prompt ... ValueError: the last line names it\n"
            f"main: full log: {log_file}\n") in console
    assert "Traceback" not in console and "Traceback" in log_file.read_text()
    assert progress.reported(info.value) == str(log_file)
    assert progress.reported(ValueError("not through a console")) is None


def test_an_expected_time_for_no_stage_of_the_job_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        StageRunner(tmp_path, plan=["sft", "eval"], expected={"sft": 1, "evl": 2})
    assert "['evl'] are not stages of this job" in caplog.text


def test_an_exit_inside_the_job_is_said_too(tmp_path, capfd):
    """Ray's driver turns SIGTERM (a `timeout`, a scheduler) into SystemExit."""
    with pytest.raises(SystemExit):
        with console_job(tmp_path / "main.log", tmp_path / "p.jsonl"):
            raise SystemExit(1)
    assert "main: stopped (exit 1)\nmain: full log: " in capfd.readouterr().out


def test_a_relative_progress_path_reaches_workers_that_run_in_other_directories(tmp_path, monkeypatch, capfd):
    """`make run` passes runs/main/logs/progress.jsonl; Ray workers run elsewhere, so the variable must be
    absolute (it was relative, and every SFT step report failed with 'No such file or directory')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with console_job(Path("run/logs/main.log"), Path("run/logs/progress.jsonl"), poll_s=0.05):
        assert os.path.isabs(os.environ[progress.ENV])
        os.chdir(tmp_path / "elsewhere")  # a worker's working directory
        progress.report("sft steps", 1, 4)
        os.chdir(tmp_path)
    assert json.loads((tmp_path / "run/logs/progress.jsonl").read_text())["task"] == "sft steps"


def test_increments_from_several_processes_are_summed(tmp_path, monkeypatch):
    """Engine actors of a Ray Data pool report per batch (`advance`); the reader adds them up."""
    f = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(f))
    for n in (32, 32, 10):
        progress.advance("trajectories labelled", n, 100)
    records, _ = read_new(f, 0)
    state = ProgressState()
    for r in records:
        state.feed(r)
    assert state.tasks["trajectories labelled"].done == 74 and state.text().startswith("trajectories labelled 74/100")
