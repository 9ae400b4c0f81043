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

    def materialise(policy, weights, out_dir):  # each scored checkpoint is the last one materialised
        scored.append({"policy": policy["name"], "weights": dict(weights)})
        return real_materialise(policy, weights, out_dir)

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


@pytest.mark.parametrize("ids", [False, True])
def test_findings_from_hand_made_rows(ids):
    """Rows name objectives by id (`assistant/concision`; ids=True) or by a shared bare name: same findings."""
    from pipeline.eval.findings import findings

    def oid(task, name):
        return f"{task}/{name}" if ids else name

    def row(policy, task, obj, mean, weights=None, decoding="plain", se=0.05):
        return {"policy": policy, "task": task, "objective": oid(task, obj), "mean": mean, "n": 10, "se": se,
                "weights": json.dumps({oid(task, k): v for k, v in weights.items()}) if weights else None,
                "decoding": decoding}

    eq = {"thoroughness": 0.5, "concision": 0.5}
    sweep = [({"thoroughness": 1.0, "concision": 0.0}, 0.6, 0.1), (eq, 0.5, 0.3), ({"thoroughness": 0.0, "concision": 1.0}, 0.2, 0.5)]
    rows = [row("sft", "assistant", "thoroughness", 0.4), row("sft", "assistant", "concision", 0.2),
            row("single-head DPO", "assistant", "thoroughness", 0.45), row("single-head DPO", "assistant", "concision", 0.35)]
    rows += [row("MAH-DPO", "assistant", o, v, w) for w, t, c in sweep for o, v in (("thoroughness", t), ("concision", c))]
    acc = {"accuracy": 0.5, "engagement": 0.5}
    rows += [row("MAH-DPO", "math_word", "accuracy", 0.5, acc, "guided(K=1)"),
             row("MAH-DPO", "math_word", "accuracy", 0.75, acc, "guided(K=4)")]
    f = findings(rows)
    # F1: thoroughness 0.5 > 0.4 and concision 0.3 > 0.2 (math has no SFT rows: not counted)
    assert f["F1"][0] is True and "noise 2 SE = 0.141" in f["F1"][1]
    assert "assistant/thoroughness: MAH-DPO 0.500" in f["F1"][1] and "assistant/assistant" not in f["F1"][1] + f["F3"][1]
    # F2: 0.5/0.3 vs 0.45/0.35: better in sum but not on both
    assert f["F2"][0] is False and "not better on both" in f["F2"][1]
    # F3: thoroughness 0.2 -> 0.5 -> 0.6 and concision 0.1 -> 0.3 -> 0.5 as their weight grows
    assert f["F3"][0] is True and "0.200 -> 0.500 -> 0.600 (monotone up" in f["F3"][1]
    # F4: K=4 beats K=1 on the same problems
    assert f["F4"][0] is True and "guided(K=4) 0.750 vs K=1 0.500" in f["F4"][1]
    rows[-1]["mean"] = 0.25
    assert findings(rows)["F4"][0] is False
