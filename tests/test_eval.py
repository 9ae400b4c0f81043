"""Evaluation helpers: Pareto front and hypervolume."""

import json

import numpy as np
import pytest

from pipeline.eval.pareto import hypervolume, pareto_front


def test_pareto_front_and_hypervolume_by_hand():
    pts = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [0.5, 0.5]])
    assert sorted(pareto_front(pts).tolist()) == [0, 1, 2, 4]  # (0.4, 0.4) is dominated; ties both stay
    # union of [0,1]x[0,0]... : rectangles 1x0 + 0x1 + 0.5x0.5 = 0.25
    assert hypervolume(pts) == pytest.approx(0.25)
    assert hypervolume(np.array([[0.6, 0.2], [0.2, 0.6]])) == pytest.approx(0.6 * 0.2 + 0.2 * 0.6 - 0.2 * 0.2)
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), reference=np.array([0.5, 0.5, 0.5])) == pytest.approx(0.125)
    assert hypervolume(np.zeros((0, 2))) == 0.0


def test_eval_job_sweeps_weights_and_writes_report(tmp_path, tiny_model_dir, steerable_policy, monkeypatch):
    """jobs.eval on tiny models (transformers engine, weights swapped in place): a plain model and a
    multi-head one along a 3-point sweep, plus guided decoding; Parquet, Markdown and plots written.
    Along the sweep the steerable policy's answers move from its accuracy head's token to its
    engagement head's (the built-in scorers give this random model 0 everywhere, so the texts
    the eval scored are checked)."""
    import pyarrow.parquet as pq

    import pipeline.eval.evaluate as ev
    import pipeline.eval.task_scores as ts
    from jobs.eval import main

    scored, real_materialise, real_score = [], ev.materialise, ts.score_task

    def materialise(policy, weights, out_dir, dtype=None):  # each scored checkpoint is the last one materialised
        scored.append({"policy": policy["name"], "weights": dict(weights)})
        return real_materialise(policy, weights, out_dir, dtype)

    def score_task(task, problems, engine, **kw):
        res = real_score(task, problems, engine, **kw)
        scored[-1].update(task=task, texts=[e["response"] for e in res["episodes"]])
        return res

    monkeypatch.setattr(ev, "materialise", materialise)
    monkeypatch.setattr(ts, "score_task", score_task)
    from pipeline.data import write_records
    from pipeline.models.prm import build_prm
    from pipeline.tasks import assistant, math_word

    probs = math_word.generate(2, 0, "eval")[0] + assistant.generate(2, 0, "eval")[0]
    write_records(probs, tmp_path / "problems.parquet", "problem")
    prm, tok = build_prm(tiny_model_dir, ["accuracy", "engagement"], {"accuracy": "soft", "engagement": "soft"})
    prm.save(tmp_path / "prm", tokenizer=tok)
    path, a, b = steerable_policy
    policies = (f'[{{name: tiny, kind: hf, path: {tiny_model_dir}}}, '
                f'{{name: steer, kind: multihead, path: {path}, sweep: true}}]')
    out = main(["--problems", f"[{tmp_path / 'problems.parquet'}]", "--policies", policies, "--sweep_points", "3",
                "--engine.kind", "transformers", "--engine.dtype", "float32", "--engine.env", "{}",
                "--engine.engine_args", "{}", "--out_dir", str(tmp_path / "eval"),
                "--guided", f"{{prm: {tmp_path / 'prm'}, n_problems: 1, candidates: 2, max_steps: 2, max_step_tokens: 8}}",
                "--shared_objectives", "[accuracy, engagement]"])  # the tiny policy's and PRM's names
    rows = pq.read_table(tmp_path / "eval" / "scores.parquet").to_pylist()
    steer_math = [r for r in rows if r["policy"] == "steer" and r["task"] == "math_word" and r["decoding"] == "plain"]
    assert len(steer_math) == 3 * 2  # 3 weight vectors x 2 objectives
    # rows and weights name objective ids: shared names bare, the others <family>/<name>
    assert {r["objective"] for r in steer_math} == set(json.loads(steer_math[0]["weights"])) == {"accuracy", "engagement"}
    assert {r["objective"] for r in rows if r["task"] == "assistant"} == {"assistant/thoroughness", "assistant/concision"}
    assert {r["decoding"] for r in rows} == {"plain", "guided(K=1)", "guided(K=2)"}  # K=1: the same-problem baseline
    assert all(r["se"] >= 0 or r["n"] < 2 for r in rows)
    assert all(len(r["scores"]) == len(r["problem_ids"]) == (1 if r["decoding"] != "plain" else 2) for r in rows)
    resp = pq.read_table(tmp_path / "eval" / "responses.parquet").to_pylist()  # guided responses too
    assert {r["decoding"] for r in resp} == {"plain", "guided(K=1)", "guided(K=2)"} and out["responses"]
    assert len(resp) == 2 * 2 + 3 * 2 * 2 + 2  # tiny: 2 tasks x 2; steer: 3 points x 2 tasks x 2; guided: 2 x 1
    assert len([r for r in rows if r["policy"] == "tiny"]) == 4  # 2 tasks x 2 objectives
    assert (tmp_path / "eval" / "pareto_math_word.png").stat().st_size > 1000
    assert "hypervolume" in (tmp_path / "eval" / "eval.md").read_text()
    assert {f["policy"] for f in out["fronts"]} == {"tiny", "steer"}
    # steering moves the output: the share of the engagement head's token rises along the sweep, from
    # none at all-accuracy to all at all-engagement, in the order the rows report the weights
    along = [c for c in scored if c["policy"] == "steer" and c.get("task") == "math_word"]
    assert [c["weights"] for c in along] == [json.loads(r["weights"]) for r in steer_math[::2]] == [
        {"accuracy": 1.0, "engagement": 0.0}, {"accuracy": 0.5, "engagement": 0.5}, {"accuracy": 0.0, "engagement": 1.0}]

    def share_b(texts):
        words = [w for t in texts for w in t.split()]
        return sum(w == b.strip() for w in words) / max(1, sum(w in (a.strip(), b.strip()) for w in words))

    shares = [share_b(c["texts"]) for c in along]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares == sorted(shares), shares


class FakeEngine:
    """Stands in for a policy engine: its "checkpoint" names the policy and weights; MAH-DPO answers math
    right when half or more of the weight is on accuracy, the others answer 0; replies grow with the
    weight on a family's first objective."""

    def __init__(self, answers, ckpt):
        self.answers, self.ckpt, self.calls = answers, ckpt, 0

    def reload_weights(self, ckpt):
        self.ckpt = ckpt

    def generate(self, prompts, n=1, seeds=None, **sampling):
        policy, w = self.ckpt.split("|", 1)
        w = json.loads(w)
        first = next(iter(w.values()), 0.5)
        out = []
        for msgs in prompts:
            ref = self.answers.get(msgs[-1]["content"])
            if ref is not None:
                right = policy == "MAH-DPO" and w.get("math_word/accuracy", 0) >= 0.5
                out.append([f"We add it up step by step.\n\n\\boxed{{{ref if right else 0}}}"] * n)
            else:
                out.append([f"{policy} says" + " and more detail" * int(6 * first) + "."] * n)
        return out


def test_evaluate_keeps_per_problem_scores_and_writes_responses(tmp_path, monkeypatch):
    """evaluate() with a fake engine (no model): every row keeps per-problem scores aligned by problem id and
    a 95% interval; responses.parquet holds one row per (policy, weights, decoding, task, problem); the
    report opens with the verdicts and shows steering examples."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    import pipeline.engines.pool as pool
    import pipeline.eval.evaluate as ev
    from pipeline.eval.findings import findings
    from pipeline.eval.report import write
    from pipeline.tasks import assistant, math_word, tutoring

    probs = math_word.generate(6, 0, "eval")[0] + assistant.generate(3, 0, "eval")[0] + tutoring.generate(2, 0, "eval")[0]
    answers = {p["prompt"][-1]["content"]: p["reference"] for p in probs if p["task"] == "math_word"}
    monkeypatch.setattr(ev, "materialise", lambda pol, w, out_dir, **kw: f"{pol['name']}|{json.dumps(w)}")
    monkeypatch.setattr(pool, "make_engine", lambda cfg, ckpt: FakeEngine(answers, ckpt))
    policies = [{"name": "sft", "kind": "hf", "path": "-"}, {"name": "MAH-DPO", "kind": "multihead", "path": "-", "sweep": True}]
    rows = ev.evaluate(policies, probs, engine_cfg=SimpleNamespace(env={}), work_dir=str(tmp_path), points=5)
    n_task = {"math_word": 6, "assistant": 3, "tutoring": 2}
    assert len(rows) == 3 * 2 * (1 + 5)  # tasks x objectives x (sft + 5 sweep points)
    for r in rows:
        assert r["problem_ids"] == [p["id"] for p in probs if p["task"] == r["task"]] and len(r["scores"]) == n_task[r["task"]]
        assert r["ci_low"] <= r["mean"] <= r["ci_high"], r
    acc = {(r["policy"], r["weights"]): r for r in rows if r["objective"] == "math_word/accuracy"}
    assert acc[("sft", None)]["scores"] == [0.0] * 6
    assert acc[("MAH-DPO", json.dumps({"math_word/accuracy": 1.0, "math_word/engagement": 0.0}))]["scores"] == [1.0] * 6

    resp = pq.read_table(tmp_path / "responses.parquet").to_pylist()
    assert list(resp[0]) == list(ev.RESPONSE_COLUMNS)
    assert len(resp) == sum(n_task.values()) * 6  # every problem once per (policy, weights)
    assert len({(r["policy"], r["weights"], r["decoding"], r["task"], r["problem_id"]) for r in resp}) == len(resp)
    dialogue = next(r for r in resp if r["task"] == "tutoring")
    turns = json.loads(dialogue["response"])  # a dialogue is kept whole: tutor and student turns after the prompt
    assert turns[0]["role"] == "assistant" and turns[1]["role"] == "user"
    math_resp = next(r for r in resp if r["task"] == "math_word" and r["policy"] == "sft")
    assert math_resp["response"].endswith("\\boxed{0}") and json.loads(math_resp["scores"])["math_word/accuracy"] == 0.0
    assert json.loads(math_resp["prompt"])[-1]["content"] in answers

    f = findings(rows)
    assert "math_word/accuracy (verifiable; must not drop): MAH-DPO 1.000 vs SFT 0.000" in f["F1"][1]
    out = write(rows, tmp_path)
    md = (tmp_path / "eval.md").read_text()
    assert md.index("## Verdicts") < md.index("## Scores") < md.index("## Steering examples")
    assert "all weight on accuracy" in md and "| MAH-DPO | plain | accuracy 1, engagement 0 | 1.000 [1.000, 1.000]" in md
    assert out["responses"] == str(tmp_path / "responses.parquet")
    back = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert [r["scores"] for r in back] == [r["scores"] for r in rows]  # per-problem scores survive Parquet
