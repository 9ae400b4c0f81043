"""Paired statistics (pipeline.eval.stats), the findings built on them, and the report's tables,
verdicts and steering examples, on synthetic per-problem scores (no engine, no Ray)."""

import json
import math

import numpy as np
import pytest

from pipeline.eval.stats import mean_ci, paired, sign_test, trend


def test_sign_test_exact_values_by_hand():
    s = sign_test(9, 1)  # P[X >= 9], X ~ Bin(10, 1/2) = (10 + 1) / 1024
    assert s["p_greater"] == pytest.approx(11 / 1024) and s["p"] == pytest.approx(22 / 1024)
    assert s["p_less"] == pytest.approx(1 - 1 / 1024)  # P[X <= 9]
    assert sign_test(0, 0)["p"] == 1.0 and sign_test(5, 5)["p"] == 1.0


def test_known_shift_is_found_and_no_shift_mostly_is_not():
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.2, 64)
    s = paired((a + 0.1 + rng.normal(0, 0.05, 64)).tolist(), a.tolist())
    assert s["p"] < 0.05 and s["ci_low"] > 0 and s["diff"] == pytest.approx(0.1, abs=0.03) and s["n"] == 64
    false_alarms = 0
    for seed in range(40):
        r = np.random.default_rng(100 + seed)
        base = r.normal(0.5, 0.2, 64)
        false_alarms += paired((base + r.normal(0, 0.05, 64)).tolist(), base.tolist())["p"] < 0.05
    assert false_alarms <= 6, false_alarms  # ~5% expected (the sign test is a little conservative)


def test_pairing_matters():
    """Problems differ far more than the policies do: unpaired, the two intervals overlap almost
    entirely; paired, every problem moves the same way and the sign test is sure."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 40)
    a, b = (base + 0.02).tolist(), base.tolist()
    ca, cb = mean_ci(a), mean_ci(b)
    assert ca["ci_low"] < cb["ci_high"] and cb["ci_low"] < ca["ci_high"]  # unpaired: cannot tell
    s = paired(a, b)
    assert s["wins"] == 40 and s["p"] < 1e-9 and s["ci_low"] > 0
    # and the converse: shuffling the pairing destroys it (same two sets of values)
    assert paired(a, rng.permutation(b).tolist())["p"] > 0.05


def test_paired_drops_unscored_pairs_and_checks_alignment():
    s = paired([1.0, None, 0.0, float("nan"), 1.0], [0.0, 1.0, 0.0, 1.0, None])
    assert (s["n"], s["dropped"], s["wins"], s["ties"]) == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="not aligned"):
        paired([1.0], [1.0, 0.0])
    assert mean_ci([None, 1.0, 0.0])["n"] == 2 and math.isnan(mean_ci([])["mean"])


def test_trend_rising_flat_and_falling():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 0.5, 64)
    ws = [0.0, 0.25, 0.5, 0.75, 1.0]

    def pts(slope):
        return [(w, (base + slope * w + rng.normal(0, 0.1, 64)).tolist()) for w in ws]

    up = trend(pts(0.3))
    assert up["p"] < 0.05 and up["ci_low"] > 0 and up["mean_slope"] == pytest.approx(0.3, abs=0.08)
    assert [w for w, _ in up["means"]] == ws
    assert trend(pts(0.0))["p"] > 0.01
    assert trend(pts(-0.3))["p"] > 0.99  # one-sided: a fall is no rise
    # a problem scored at one weight only has no slope: left out and counted
    t = trend([(0.0, [1.0, None]), (1.0, [0.0, 1.0])])
    assert (t["n"], t["dropped"], t["downs"]) == (1, 1, 1)


# ---- findings on synthetic rows ----------------------------------------------------------------------

N = 64


def row(policy, task, obj, scores, weights=None, decoding="plain", ids=True):
    oid = (lambda n: f"{task}/{n}") if ids else (lambda n: n)
    ok = [s for s in scores if s is not None]
    ci = mean_ci(ok)
    return {"policy": policy, "task": task, "objective": oid(obj), "decoding": decoding,
            "weights": json.dumps({oid(k): v for k, v in weights.items()}) if weights else None,
            "mean": ci["mean"], "n": len(ok), "se": float(np.std(ok) / math.sqrt(len(ok))),
            "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
            "problem_ids": [f"{task}-{i}" for i in range(len(scores))], "scores": list(scores)}


def math_rows(rng, acc_drop=0, engagement_up=0.3, ids=True):
    """SFT and MAH-DPO at equal weights on math_word: accuracy (verifiable) and engagement (judged)."""
    acc = (rng.uniform(size=N) < 0.7).astype(float)
    eng = rng.uniform(0, 0.6, N)
    mah_acc = acc.copy()
    mah_acc[np.flatnonzero(acc == 1)[:acc_drop]] = 0.0
    eq = {"accuracy": 0.5, "engagement": 0.5}
    mah_eng = np.clip(eng + engagement_up + rng.normal(0, 0.05, N), 0, 1)
    return [row("sft", "math_word", "accuracy", acc.tolist(), ids=ids),
            row("sft", "math_word", "engagement", eng.tolist(), ids=ids),
            row("MAH-DPO", "math_word", "accuracy", mah_acc.tolist(), eq, ids=ids),
            row("MAH-DPO", "math_word", "engagement", mah_eng.tolist(), eq, ids=ids)]


@pytest.mark.parametrize("ids", [False, True])
def test_f1_holds_and_fails_on_a_significant_drop(ids):
    from pipeline.eval.findings import f1

    h, text = f1(math_rows(np.random.default_rng(4), ids=ids))
    assert h is True, text
    assert "math_word/accuracy (verifiable; must not drop)" in text and "math_word/engagement (judged; must rise)" in text
    assert "-> up" in text and "sign p = " in text and "95% CI" in text
    h, text = f1(math_rows(np.random.default_rng(4), acc_drop=15, ids=ids))  # 15 of ~45 right answers lost
    assert h is False and "-> down (fails)" in text
    h, text = f1(math_rows(np.random.default_rng(4), engagement_up=0.0))  # accuracy held, engagement not up
    assert h is False and "no significant change (fails)" in text


def test_f1_needs_per_problem_scores():
    from pipeline.eval.findings import findings

    rows = math_rows(np.random.default_rng(5))
    for r in rows:
        del r["problem_ids"], r["scores"]
    h, text = findings(rows)["F1"]
    assert h is None and "no per-problem scores" in text


def assistant_sweep(rng, conc_slope=0.4, points=5):
    base_t, base_c = rng.uniform(0, 0.4, N), rng.uniform(0, 0.4, N)
    rows = []
    for t in np.linspace(0, 1, points):
        w = {"thoroughness": round(float(t), 4), "concision": round(float(1 - t), 4)}
        rows += [row("MAH-DPO", "assistant", "thoroughness", (base_t + 0.4 * t + rng.normal(0, 0.05, N)).tolist(), w),
                 row("MAH-DPO", "assistant", "concision", (base_c + conc_slope * (1 - t) + rng.normal(0, 0.05, N)).tolist(), w)]
    return rows, base_t, base_c


def test_f3_trend_per_objective():
    from pipeline.eval.findings import f3

    rows, *_ = assistant_sweep(np.random.default_rng(6))
    h, text = f3(rows)
    assert h is True and text.count("-> rises") == 2 and "as its weight goes 0 -> 1" in text
    rows, *_ = assistant_sweep(np.random.default_rng(6), conc_slope=0.0)  # concision does not follow its weight
    h, text = f3(rows)
    assert h is False and "assistant/concision" in text and "no significant rise" in text
    rows, *_ = assistant_sweep(np.random.default_rng(6), points=3)
    assert "only 3 sweep points" in f3(rows)[1]


def test_f2_domination_rule():
    from pipeline.eval.findings import f2

    rng = np.random.default_rng(7)
    rows, base_t, base_c = assistant_sweep(rng)
    # single-head DPO at the centre of the trade-off, a little below MAH-DPO's equal-weight point on both
    single = [row("single-head DPO", "assistant", "thoroughness", (base_t + 0.1).tolist()),
              row("single-head DPO", "assistant", "concision", (base_c + 0.1).tolist())]
    h, text = f2(rows + single)
    assert h is True and "p < 0.01 (0.05 / 5 points)" in text
    assert "(thoroughness 0.5, concision 0.5)" in text.split("-> dominated by")[1]
    assert "(thoroughness 1, concision 0)" not in text.split("-> dominated by")[1]  # concision drops there
    single = [row("single-head DPO", "assistant", "thoroughness", (base_t + 0.45).tolist()),
              row("single-head DPO", "assistant", "concision", (base_c + 0.45).tolist())]
    h, text = f2(rows + single)  # above every point of the sweep on both
    assert h is False and "no point dominates" in text


def test_f4_guided_vs_k1_and_power_note():
    from pipeline.eval.findings import f4

    eq = {"accuracy": 0.5, "engagement": 0.5}
    k1 = [0.0] * 12 + [1.0] * 8
    k4 = [1.0] * 20
    rows = [row("MAH-DPO", "math_word", "accuracy", k1, eq, "guided(K=1)"),
            row("MAH-DPO", "math_word", "accuracy", k4, eq, "guided(K=4)")]
    h, text = f4(rows)
    assert h is True and "12 up / 0 down / 8 tied" in text
    rows = [row("MAH-DPO", "math_word", "accuracy", k1[10:14], eq, "guided(K=1)"),
            row("MAH-DPO", "math_word", "accuracy", k4[:4], eq, "guided(K=4)")]
    h, text = f4(rows)  # 2 wins of 4 problems: p = 0.25 at best
    assert h is False and "the smallest one-sided p they could give is 0.25" in text


# ---- report --------------------------------------------------------------------------------------------

def test_table_verdicts_and_steering_examples():
    from pipeline.eval.findings import findings
    from pipeline.eval.report import steering_examples, table, verdicts_section

    rows = math_rows(np.random.default_rng(8))
    md = table(rows)
    assert "### math_word" in md and "| policy | decoding | weights | math_word/accuracy | math_word/engagement | n |" in md
    r = rows[0]
    assert f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" in md
    sec = verdicts_section(findings(rows))
    assert sec.startswith("| finding | verdict | evidence |") and "| **F1** " in sec and "**holds**" in sec
    assert "Holds: F1." in sec and "Not measured: F2, F3, F4." in sec and "beats SFT" in sec

    def resp(policy, weights, pid, text, scores):
        return {"policy": policy, "weights": json.dumps(weights) if weights else None, "decoding": "plain",
                "task": "assistant", "problem_id": pid, "prompt": json.dumps([{"role": "user", "content": f"Q {pid}"}]),
                "response": text, "scores": json.dumps(scores)}

    ends = [{"assistant/thoroughness": 1.0, "assistant/concision": 0.0},
            {"assistant/thoroughness": 0.0, "assistant/concision": 1.0}]
    rs = []
    for pid, spread in (("a", 0.1), ("b", 0.9), ("c", 0.5)):
        rs.append(resp("sft", None, pid, f"sft answer {pid}", {"assistant/thoroughness": 0.5}))
        rs.append(resp("MAH-DPO", ends[0], pid, "long " * 200 + pid, {"assistant/thoroughness": 0.5 + spread / 2}))
        rs.append(resp("MAH-DPO", ends[1], pid, f"short {pid}", {"assistant/thoroughness": 0.5 - spread / 2}))
    md = steering_examples(rs, k=2)
    assert md.index("problem `b`") < md.index("problem `c`") and "problem `a`" not in md  # largest spread first
    assert "all weight on thoroughness" in md and "all weight on concision" in md and "[...]" in md
    assert "```text\nsft answer b\n```" in md
