"""Step labelling: exact labels on a fake policy with known step values, every method,
early stopping, and the Ray Data job with resume after a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from fakes import FakePolicy
from pipeline.config import LabelJobConfig, MCConfig, load_config
from pipeline.data import read_records, write_records
from pipeline.labeling.job import run_labeling
from pipeline.labeling.steps import label_objective
from pipeline.objectives import build_objective
from pipeline.tasks import tutoring

VALUES = [0.25, 0.75, 0.5, 1.0]
ACC = {"name": "accuracy", "kind": "verifiable", "verifier": "math", "splitter": "blank_lines"}
GOOD = {"name": "good", "kind": "judged", "splitter": "blank_lines", "judge": {"callable": "fakes:says_good"}}


def traj(i: int, values=VALUES, outcome=1.0) -> dict:
    return {"id": f"t{i}", "problem_id": f"p{i}", "prompt": [{"role": "user", "content": f"Q{i}? answer=42"}],
            "steps": [f"step {j} value={v}" for j, v in enumerate(values)], "final": "", "outcome": outcome,
            "policy": "fake", "turns": None, "reference": "42", "meta": {}}


def test_mc_soft_values_match_the_true_step_values():
    obj = build_objective(ACC)
    mc = MCConfig(k=4, gamma=0.9, normalize=False)
    (lab,) = label_objective("mc", FakePolicy(), obj, [traj(0)], mc, {"seed": 0})
    n = len(VALUES)
    # r_t = true value; the last step's r_n is the outcome z = 1; target = r_t + gamma^(n-t) z.
    expected = [v + 0.9 ** (n - t) * 1.0 for t, v in enumerate(VALUES[:-1] + [1.0], start=1)]
    assert lab.labels == pytest.approx(expected) and lab.label_kind == "soft" and lab.rollouts_per_step == 4
    mc = MCConfig(k=4, gamma=0.9, normalize=True)
    (lab,) = label_objective("mc", FakePolicy(), obj, [traj(0, outcome=0.0)], mc, {"seed": 0})
    assert lab.labels == pytest.approx([0.25 / 1.729, 0.75 / 1.81, 0.5 / 1.9, 0.0], rel=1e-3)  # z = 0: r_t / (1 + g^(n-t))
    assert all(0 <= x <= 1 for x in lab.labels)


def test_mc_hard_labels_and_early_stop():
    obj = build_objective(ACC)
    FakePolicy.requests = 0
    (full,) = label_objective("mc", FakePolicy(), obj, [traj(0)], MCConfig(k=8, hard_label="majority"), {"seed": 0})
    all_requests = FakePolicy.requests
    FakePolicy.requests = 0
    cfg = MCConfig(k=8, round_size=2, early_stop=True, hard_label="majority")
    (early,) = label_objective("mc", FakePolicy(), obj, [traj(0)], cfg, {"seed": 0})
    assert full.labels == early.labels == [0.0, 1.0, 0.0, 1.0]  # strict majority: 0.5 is not > 1/2
    assert FakePolicy.requests < all_requests == 8 * (len(VALUES) - 1)
    (anyl,) = label_objective("mc", FakePolicy(), obj, [traj(0)], MCConfig(k=8, hard_label="any"), {"seed": 0})
    assert anyl.labels == [1.0, 1.0, 1.0, 1.0]


def test_judge_majority_vote_over_continuations():
    obj = build_objective(GOOD)
    (lab,) = label_objective("judge_mc", FakePolicy(), obj, [traj(0, values=[0.75, 0.25, 0.0])], MCConfig(k=4), {"seed": 0})
    # prefixes 1-2 by vote; the last step is the judge on the full response ("... value=0.0" is not "good")
    assert lab.labels == [1.0, 0.0, 0.0] and lab.label_kind == "hard"


def test_dialogue_prefix_and_outcome_labels():
    p = tutoring.generate(3, 0, "train")[0][0]
    meta = json.loads(p["meta"])
    d = list(p["prompt"])
    for e, _ in meta["steps"]:
        d.append({"role": "assistant", "content": f"What is {e}?"})
        d.append({"role": "user", "content": tutoring.student(d, meta)})
    turns = d[len(p["prompt"]):]
    tr = {"id": "d0", "prompt": p["prompt"], "steps": [m["content"] for m in turns if m["role"] == "assistant"],
          "turns": turns, "outcome": None, "reference": p["reference"], "meta": meta}
    acc = build_objective(tutoring.OBJECTIVES[0])
    (lab,) = label_objective("dialogue_prefix", None, acc, [tr], MCConfig(), {})
    # accuracy of each prefix: only after the last step does the student state the answer
    assert lab.labels == [0.0] * (len(meta["steps"]) - 1) + [1.0]
    (out,) = label_objective("outcome", None, acc, [tr], MCConfig(), {})
    assert out.labels == [None] * (len(meta["steps"]) - 1) + [1.0] and out.label_kind == "soft"
    assert type(out.unparseable) is int  # a bool here failed the int32 column of the label shards


def test_judge_prefix_rates_each_single_turn_prefix_itself():
    obj = build_objective(GOOD)
    tr = {**traj(0), "steps": ["fine", "this is good", "bad again", "good"]}
    # no engine: the judge sees steps[:t] joined, never a continuation
    (lab,) = label_objective("judge_prefix", None, obj, [tr], MCConfig(), {})
    assert lab.labels == [0.0, 1.0, 0.0, 1.0] and lab.label_kind == "hard" and lab.rollouts_per_step == 0


def test_demonstration_trajectories_cover_both_sides_of_every_objective(caplog):
    import logging

    from pipeline.labeling.demos import demo_trajectories
    from pipeline.objectives import build_objectives
    from pipeline.tasks import get_task, splits

    problems, sft = [], []
    for task in ("math_word", "assistant", "tutoring"):
        p, d = splits(task, 48, 4, 0)["train"]
        problems += p
        sft += d
    with caplog.at_level(logging.INFO, logger="pipeline.labeling.demos"):
        rows = demo_trajectories(problems, sft, 24)
    # what was not made is said, with why and how many (no silent drop): 24 problems per family asked,
    # math twice each (the demonstration and its corrupted copy); made + reported = asked, per reason
    made = {(task, tag): sum(r["problem_id"].startswith(task) and r["id"].endswith(f"-{tag}") for r in rows)
            for task in ("math_word", "assistant", "tutoring") for tag in ("demo", "corrupt")}
    assert made[("assistant", "demo")] == made[("tutoring", "demo")] == 24 and sum(made.values()) == len(rows)
    reports = [r for r in caplog.records if r.name == "pipeline.labeling.demos" and "not made" in r.getMessage()]
    assert len(reports) == 1, caplog.text  # this data has single-step and uncorruptible styles
    n_made, not_made = reports[0].args
    assert n_made == len(rows) and set(not_made) <= {
        "math_word/demo: single step", "math_word/corrupt: single step",
        "math_word/corrupt: no verbatim steps to corrupt"}, not_made
    for tag in ("demo", "corrupt"):
        reported = sum(v for k, v in not_made.items() if k.startswith(f"math_word/{tag}:"))
        assert reported > 0 and made[("math_word", tag)] + reported == 24, (tag, made, not_made)
    assert f"{len(rows)} made, not made: {not_made}" in reports[0].getMessage()
    by_id = {p["id"]: p for p in problems}
    for task in ("math_word", "assistant", "tutoring"):
        trajs = [{**r, "reference": by_id[r["problem_id"]]["reference"], "meta": json.loads(by_id[r["problem_id"]]["meta"])}
                 for r in rows if by_id[r["problem_id"]]["task"] == task]
        assert len({t["problem_id"] for t in trajs}) <= 24 and trajs
        for name, obj in build_objectives(get_task(task).objectives).items():
            if obj.kind == "verifiable":  # MC needs an engine: check the outcomes instead
                outcomes = [obj.score_batch([{"prompt": t["prompt"], "response": "\n\n".join(t["steps"]),
                                              "reference": t["reference"], "meta": t["meta"]}])[0] for t in trajs]
                assert 0 < sum(outcomes) < len(outcomes), name  # demonstrations right, corrupted copies wrong
                continue
            labels = [x for lab in label_objective("judge_prefix", None, obj, trajs, MCConfig(), {}) for x in lab.labels]
            assert 0 < sum(labels) < len(labels), (task, name)
    demo = next(r for r in rows if r["id"].endswith("-demo") and r["id"].replace("-demo", "-corrupt") in {x["id"] for x in rows}
                and r["problem_id"].startswith("math_word"))
    bad = next(r for r in rows if r["id"] == demo["id"].replace("-demo", "-corrupt"))
    # the copy leaves the demonstration at its first computation (no shared prefix with the other outcome)
    first = next(i for i, s in enumerate(demo["steps"]) if "=" in s)
    assert bad["steps"][:first] == demo["steps"][:first] and bad["steps"][first] != demo["steps"][first]
    tutor = next(r for r in rows if r["turns"])
    # a tutoring demonstration is the whole dialogue: the tutor's turns are its steps, each answered by the student
    assert tutor["steps"] == [m["content"] for m in tutor["turns"] if m["role"] == "assistant"]
    assert [m["role"] for m in tutor["turns"]][:2] == ["assistant", "user"]


def write_inputs(tmp_path: Path, n_shards: int = 3, per_shard: int = 4):
    problems, shards = [], []
    for s in range(n_shards):
        rows = []
        for i in range(per_shard):
            k = s * per_shard + i
            problems.append({"id": f"p{k}", "task": "math_word", "prompt": [{"role": "user", "content": f"Q{k}? answer=42"}],
                             "reference": "42", "meta": {"values": [42], "quantities": []}})
            t = traj(k)
            rows.append({f: t[f] for f in ("id", "problem_id", "prompt", "steps", "final", "outcome", "policy", "turns")})
        shards.append(write_records(rows, tmp_path / "traj" / f"part-{s}.parquet", "trajectory"))
    write_records(problems, tmp_path / "problems.parquet", "problem")
    return {"trajectories": [str(tmp_path / "traj")], "problems": [str(tmp_path / "problems.parquet")],
            "out_dir": str(tmp_path / "labels"), "objectives": {"math_word": ["accuracy"]},
            "mc": {"k": 4, "normalize": False}, "engine": {"kind": "callable", "target": "fakes:FakePolicy",
                                                           "batch_size": 2, "options": {"delay": 0.0}}}


def test_label_job_resumes_after_kill_with_exact_rows(tmp_path, ray_session):
    over = write_inputs(tmp_path)
    cfg_file = tmp_path / "label.yaml"
    slow = {**over, "engine": {**over["engine"], "options": {"delay": 1.5}}}
    cfg_file.write_text(json.dumps(slow))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label_steps", "--config", str(cfg_file)], env=env,
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    out = tmp_path / "labels"
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-run, after its first shard
    proc.wait()
    first = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(first) < 3, first
    assert not list(out.glob(".*.tmp"))  # no half-written shard

    cfg = load_config(LabelJobConfig, None, over)
    report = run_labeling(cfg)
    assert sorted(Path(p).name for p in report.shards_skipped) == first
    t, _ = read_records(str(out), "stepwise")
    ids = t.column("id").to_pylist()
    assert len(ids) == 12 and len(set(ids)) == 12  # every trajectory once, none twice
    row = t.to_pylist()[0]
    assert row["labels"] == pytest.approx([v + 0.9 ** (4 - i) for i, v in enumerate([0.25, 0.75, 0.5, 1.0], 1)])
    again = run_labeling(cfg)
    assert again.shards_written == [] and len(again.shards_skipped) == 3


def test_failed_rows_are_counted_and_kept_aside(tmp_path, ray_session):
    over = write_inputs(tmp_path, n_shards=1, per_shard=3)
    probs, _ = read_records(over["problems"][0], "problem")
    write_records(probs.to_pylist()[1:], over["problems"][0], "problem")  # t0's problem is gone
    report = run_labeling(load_config(LabelJobConfig, None, over))
    assert report.failed_inputs == 1 and report.rows == 2
    failed = (tmp_path / "labels" / "_failed" / "part-0.jsonl").read_text().splitlines()
    assert [json.loads(x)["input"] for x in failed] == ["t0"] and "problem p0 not found" in failed[0]


def test_an_empty_trajectory_shard_gets_an_empty_label_shard_and_the_rest_are_labelled(tmp_path, ray_session, caplog):
    """A rollout shard whose every problem failed is written empty; labelling used to stop on it (EmptyInput)."""
    over = write_inputs(tmp_path, n_shards=2, per_shard=2)
    write_records([], tmp_path / "traj" / "part-1.parquet", "trajectory")
    report = run_labeling(load_config(LabelJobConfig, None, over))
    assert report.rows == 2 and report.failed_inputs == 0
    assert read_records(str(tmp_path / "labels" / "part-0.parquet"), "stepwise")[0].num_rows == 2
    import pyarrow.parquet as pq

    assert pq.read_metadata(tmp_path / "labels" / "part-1.parquet").num_rows == 0
    assert "part-1.parquet holds no trajectories" in caplog.text


def _family_trajectories():
    """One trajectory per problem of math_word and tutoring (families that both have accuracy and engagement)."""
    from pipeline.tasks import math_word

    problems = math_word.generate(2, 0)[0] + tutoring.generate(2, 0)[0]
    trajs = []
    for p in problems:
        steps = ["First, 3 x 4 = 12, because each box holds 4.", "The answer is \\boxed{12}."]
        turns = None
        if p["task"] == "tutoring":
            steps = ["What do you get if you multiply the first two numbers?"]
            turns = [{"role": "assistant", "content": steps[0]}, {"role": "user", "content": "Is it 12?"}]
        trajs.append({"id": f"{p['id']}-t", "problem_id": p["id"], "prompt": p["prompt"], "steps": steps, "final": "",
                      "outcome": None, "policy": "x", "turns": turns, "_shard": "s0"})
    return {p["id"]: p for p in problems}, pa.Table.from_pylist(trajs)


@pytest.mark.parametrize("shared,ids", [
    ((), ["math_word/accuracy", "math_word/engagement", "tutoring/accuracy", "tutoring/engagement"]),
    (("accuracy", "engagement"), ["accuracy", "engagement"]),
])
def test_same_name_in_two_families_is_two_prm_outputs_unless_declared_shared(shared, ids):
    """Label rows carry objective ids; fit_prm's outputs are the ids in the data (merge_stepwise's width).
    On the old code (rows tagged by bare name) both cases gave 2 outputs."""
    from pipeline.labeling.job import label_batch
    from pipeline.train.prm import merge_stepwise

    problems, batch = _family_trajectories()
    # no engine: the verifier's outcome instead of MC, the judge on prefixes instead of judge_mc
    acc, eng = ("accuracy", "engagement") if shared else ("math_word/accuracy", "math_word/engagement")
    out = label_batch(None, batch, problems=problems, objectives={}, extra={},
                      methods={acc: "outcome", eng: "judge_prefix"}, mc={}, sampling={}, shared=list(shared)).to_pylist()
    assert not [r for r in out if r["_error"]], out
    assert sorted({r["objective"] for r in out}) == ids
    assert {r["id"].split("-t/", 1)[1] for r in out} == set(ids)  # row ids name the objective id too
    by = {(r["_input"].split("-")[0], r["objective"]): r["label_kind"] for r in out}
    # tutoring accuracy keeps its own method (dialogue prefix, hard) unless the shared id sets one for both
    assert by[("tutoring", "tutoring/accuracy" if not shared else "accuracy")] == ("hard" if not shared else "soft")
    examples = merge_stepwise(out, ids)
    assert {len(ex["labels"][0]) for ex in examples} == {len(ids)}


def test_label_method_keys_resolve_to_one_objective():
    from pipeline.labeling.job import label_methods

    cfg = LabelJobConfig(method={"thoroughness": "judge_prefix", "math_word/engagement": "judge_mc"})
    assert label_methods(cfg) == {"assistant/thoroughness": "judge_prefix", "math_word/engagement": "judge_mc"}
    with pytest.raises(ValueError, match=r"'engagement' is ambiguous.*math_word/engagement.*tutoring/engagement"):
        label_methods(LabelJobConfig(method={"engagement": "judge_prefix"}))  # was: applied to both families
    assert label_methods(LabelJobConfig(method={"engagement": "judge_prefix"}, shared_objectives=["engagement"])) == {
        "engagement": "judge_prefix"}
    with pytest.raises(ValueError, match="'engagment' is not an objective"):
        label_methods(LabelJobConfig(method={"engagment": "judge_prefix"}))  # was: silently ignored
    with pytest.raises(ValueError, match="shared_objectives: \\['acuracy'\\] is no task's objective"):
        label_methods(LabelJobConfig(shared_objectives=["acuracy"]))


class _RaisingEngine:
    """An engine whose every call raises `exc`: a declared input error or anything else."""

    def __init__(self, exc):
        self.exc = exc

    def complete(self, *a, **k):
        raise self.exc

    generate = complete

    def render(self, prompt):
        return json.dumps(prompt)


def test_only_declared_input_errors_are_quarantined_others_stop_the_job():
    """An out-of-memory error or a bug inside labelling used to be turned into 'failed inputs'
    (the job exited 0); now it propagates, and only InputError is counted per trajectory."""
    from pipeline.data.records import InputError
    from pipeline.labeling.job import label_batch

    problems, batch = _family_trajectories()
    kw = dict(problems=problems, objectives={}, extra={}, methods={}, mc={"k": 2}, sampling={})
    with pytest.raises(RuntimeError, match="out of memory"):
        label_batch(_RaisingEngine(RuntimeError("out of memory")), batch, **kw)
    out = label_batch(_RaisingEngine(InputError("prompt too long")), batch, **kw).to_pylist()
    failed = [r for r in out if r["_error"]]
    # math_word's objectives call the engine; tutoring's default methods (dialogue prefix) do not
    assert {r["_input"] for r in failed} == {t for t in batch.column("id").to_pylist() if t.startswith("math_word")}
    assert all("InputError: prompt too long" in r["_error"] for r in failed)


def test_unknown_task_fails_its_trajectory_alone():
    from pipeline.labeling.job import label_batch

    problems, batch = _family_trajectories()
    first = batch.column("problem_id")[0].as_py()
    problems[first] = {**problems[first], "task": "no_such_task"}
    out = label_batch(None, batch, problems=problems, objectives={}, extra={},
                      methods={"math_word/accuracy": "outcome", "math_word/engagement": "judge_prefix",
                               "tutoring/engagement": "judge_prefix"}, mc={}, sampling={}).to_pylist()
    bad = [r for r in out if r["_error"]]
    assert [r["_input"] for r in bad] == [f"{first}-t"] and "field 'task': unknown task 'no_such_task'" in bad[0]["_error"]
    assert {r["_input"] for r in out if not r["_error"]} == {f"{p}-t" for p in problems if p != first}
