"""The report's repetition measure (pipeline.eval.repetition): loops are named, ordinary text is not."""

from __future__ import annotations

import json

import pytest

from pipeline.eval.repetition import degenerate, policy_text, repetition_table, seq_rep


def test_seq_rep_is_zero_without_repeats_and_high_for_a_loop():
    assert seq_rep("Sam has 3 apples and buys 4 more, so he has 7 apples.") == 0.0
    assert seq_rep("one two three") == 0.0  # fewer than 4 words: no 4-grams
    loop = "Good start. What is 35 - 6? " + "Good question. Good start. " * 20
    assert seq_rep(loop) > 0.8
    # 1 - distinct / total: "a b c d a b c d" has 5 4-grams, 4 distinct
    assert seq_rep("a b c d a b c d") == pytest.approx(1 - 4 / 5)


def test_a_dialogue_is_measured_on_its_assistant_turns_only():
    d = [{"role": "user", "content": "I think it is 12. " * 10}, {"role": "assistant", "content": "Why 12?"},
         {"role": "user", "content": "Because 5 + 7."}, {"role": "assistant", "content": "Good, check it with 7 + 5."}]
    assert policy_text(json.dumps(d)) == "Why 12? Good, check it with 7 + 5."
    assert seq_rep(policy_text(json.dumps(d))) == 0.0  # the student's repeats are not the policy's
    assert policy_text("plain text") == "plain text" and policy_text('"a JSON string"') == "a JSON string"


def test_points_that_loop_far_more_than_sft_are_named():
    loop = "Good start. " * 30
    fine = "First add the two numbers, then check the sum against the estimate."
    rows = [{"policy": "sft", "weights": None, "decoding": "plain", "task": "tutoring", "response": fine}] * 4
    w = json.dumps({"tutoring/engagement": 1.0, "tutoring/accuracy": 0.0})
    rows += [{"policy": "MAH-DPO", "weights": w, "decoding": "plain", "task": "tutoring", "response": r}
             for r in (loop, loop, fine, fine)]
    rows += [{"policy": "single-head DPO", "weights": None, "decoding": "plain", "task": "tutoring", "response": r}
             for r in (fine, fine, fine, loop)]
    t = repetition_table(rows)
    by = {r["policy"]: r for r in t}
    assert by["sft"]["looping"] == 0 and by["MAH-DPO"]["looping"] == 0.5 and by["single-head DPO"]["looping"] == 0.25
    assert [r["policy"] for r in degenerate(t)] == ["MAH-DPO", "single-head DPO"]
    assert [r["policy"] for r in degenerate(t, margin=0.3)] == ["MAH-DPO"]


def test_the_report_section_names_the_degenerate_points():
    from pipeline.eval.report import repetition_section

    loop, fine = "Good start. " * 30, "First add the two numbers, then check the sum against the estimate."
    w = json.dumps({"tutoring/engagement": 1.0, "tutoring/accuracy": 0.0})
    rows = [{"policy": "sft", "weights": None, "decoding": "plain", "task": "tutoring", "response": fine}] * 2
    ok = repetition_section(rows + [{"policy": "MAH-DPO", "weights": w, "decoding": "plain", "task": "tutoring",
                                     "response": fine}] * 2)
    assert ok.startswith("No evaluated point loops far more than sft (looping share")
    bad = repetition_section(rows + [{"policy": "MAH-DPO", "weights": w, "decoding": "plain", "task": "tutoring",
                                      "response": loop}] * 2)
    assert bad.startswith("**Degenerate:** 1 of 2 evaluated points loop far more than sft (looping share")
    assert "MAH-DPO (engagement 1, accuracy 0, plain) on tutoring: 1.00" in bad
