"""StageRunner: resume respects the config (fingerprints of settings and inputs), stale outputs moved aside."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.stages import StageRunner, changed_keys


def _job(run_dir, cfg: dict, calls: list[str]) -> dict:
    """Three toy stages a -> b -> c; each writes a file in its own directory and records that it ran.
    b refuses to start over its own stale output (what a plan or shard cache would silently reuse)."""
    stages = StageRunner(run_dir)

    def stage(name, upstream):
        def fn():
            out = run_dir / name / "out.txt"
            assert not out.exists(), f"{name}: stale output of another config visible"
            calls.append(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(cfg[name]))
            return {"value": cfg[name]["x"] + upstream}
        return fn

    a = stages.run("a", stage("a", 0), config=cfg["a"], outputs=[run_dir / "a"])
    b = stages.run("b", stage("b", a["value"]), config=cfg["b"], inputs=["a"], outputs=[run_dir / "b"])
    c = stages.run("c", stage("c", b["value"]), config=cfg["c"], inputs=["b"], outputs=[run_dir / "c"])
    return {"c": c, "timings": stages.timings}


def _cfg(**b):
    return {"a": {"x": 1}, "b": {"x": 10, "train": {"lr": 1e-3, "steps": 5}, **b}, "c": {"x": 100}}


def test_unchanged_rerun_skips_every_stage(tmp_path):
    calls = []
    assert _job(tmp_path, _cfg(), calls)["c"] == {"value": 111}
    assert calls == ["a", "b", "c"]
    out = _job(tmp_path, _cfg(), calls)
    assert calls == ["a", "b", "c"] and out["c"] == {"value": 111}
    assert all(t["skipped"] for t in out["timings"].values())
    assert not list((tmp_path / "stages").glob("*.started"))  # finished stages leave only their markers


def test_changed_setting_redoes_that_stage_and_later_ones_naming_the_key(tmp_path, caplog):
    calls = []
    _job(tmp_path, _cfg(), calls)
    calls.clear()
    new = _cfg(train={"lr": 2e-3, "steps": 5})
    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        out = _job(tmp_path, new, calls)
    assert calls == ["b", "c"]  # a kept; c's own settings are the same, its input b was redone
    assert out["timings"]["a"]["skipped"] and not out["timings"]["c"]["skipped"]
    msgs = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert "train.lr (0.001 -> 0.002)" in msgs["stage b"] and "steps" not in msgs["stage b"]
    assert "input stage(s) redone or changed: b" in msgs["stage c"]
    # the old outputs and markers are kept under previous/, the live ones hold the new settings
    prev_b = next((tmp_path / "previous").glob("b-*"))
    assert json.loads((prev_b / "b" / "out.txt").read_text())["train"]["lr"] == 1e-3
    assert json.loads((prev_b / "stages" / "b.json").read_text())["config"]["train"]["lr"] == 1e-3
    assert json.loads((tmp_path / "b" / "out.txt").read_text())["train"]["lr"] == 2e-3
    assert (next((tmp_path / "previous").glob("c-*")) / "c" / "out.txt").exists()
    calls.clear()
    _job(tmp_path, new, calls)
    assert calls == []  # the redone stages are done under the new settings


def test_interrupted_stage_resumes_only_under_the_same_settings(tmp_path):
    with pytest.raises(RuntimeError):
        _crash(tmp_path, "a", StageRunner(tmp_path))
    seen = []
    StageRunner(tmp_path).run("a", lambda: seen.append((tmp_path / "a" / "partial").exists()), config={"lr": 1},
                              outputs=[tmp_path / "a"])
    assert seen == [True]  # same settings: the partial outputs stay (the harness resumes its checkpoints)

    with pytest.raises(RuntimeError):
        _crash(tmp_path, "b", StageRunner(tmp_path))
    seen.clear()
    StageRunner(tmp_path).run("b", lambda: seen.append((tmp_path / "b" / "partial").exists()), config={"lr": 2},
                              outputs=[tmp_path / "b"])
    assert seen == [False]  # other settings: moved aside, not resumed
    assert (next((tmp_path / "previous").glob("b-*")) / "b" / "partial").read_text() == "old"


def _crash(tmp_path, name, stages):
    def crash():
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial").write_text("old")
        raise RuntimeError("killed")

    stages.run(name, crash, config={"lr": 1}, outputs=[tmp_path / name])


def test_marker_without_fingerprint_is_adopted_and_missing_inputs_refused(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.json").write_text(json.dumps({"outputs": {"v": 1}, "seconds": 3.0}))
    stages = StageRunner(tmp_path)
    assert stages.run("a", lambda: pytest.fail("redone"), config={"x": 1}) == {"v": 1}
    assert "fingerprint" in json.loads((tmp_path / "stages" / "a.json").read_text())
    with pytest.raises(ValueError, match=r"stage c: its input stage\(s\) \['b'\] have not run"):
        stages.run("c", dict, inputs=["b"])


def test_changed_keys_dotted():
    assert changed_keys({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"b": 1, "c": [2]}, "e": 3}) == {
        "a.c": ([1], [2]), "d": (2, "<absent>"), "e": ("<absent>", 3)}


def test_dump_config_keeps_the_earlier_config(tmp_path):
    from pipeline.config import DPOConfig, dump_config

    dump_config(DPOConfig(beta=0.1), tmp_path / "config.yaml")
    dump_config(DPOConfig(beta=0.1), tmp_path / "config.yaml")
    assert not (tmp_path / "configs").exists()  # the same config again: nothing to keep
    dump_config(DPOConfig(beta=0.2), tmp_path / "config.yaml")
    dump_config(DPOConfig(beta=0.3), tmp_path / "config.yaml")
    kept = sorted((tmp_path / "configs").glob("config-*.yaml"), key=lambda p: p.stat().st_mtime)
    assert [("beta: 0.1" in p.read_text(), "beta: 0.2" in p.read_text()) for p in kept] == [(True, False), (False, True)]
    assert "beta: 0.3" in (tmp_path / "config.yaml").read_text()
