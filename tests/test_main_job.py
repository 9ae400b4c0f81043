"""The main job end to end, quick profile: every stage on local Ray with SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_main_job_quick_profile_end_to_end_and_resume(tmp_path, ray_session):
    from jobs.main import main

    argv = ["--config", "jobs/configs/main_quick.yaml", "--run_dir", str(tmp_path / "run")]
    out = main(argv)
    run = tmp_path / "run"
    stages = sorted(p.stem for p in (run / "stages").glob("*.json"))
    assert stages == sorted(["base_model", "tasks", "sft", "rollout", "label_steps", "fit_prm", "build_pairs",
                             "fit_policy_mahdpo", "fit_policy_single", "fit_policy_soup", "fit_policy_modpo", "eval",
                             "serve"])
    report = (run / "report.md").read_text()
    for needle in ("Time per stage", "The paper's findings in miniature", "**F1**", "**F4**", "Serve check",
                   "pareto_math_word.png", "| objective | steps | AUROC (+- SE) |", "task's own verifier / judge",
                   "Why, from this run's data", "- Floor: the SFT policy scores 0 on", "MODPO",
                   "Shared objectives: none", "| math_word/accuracy | math_word | soft |", "| tutoring/accuracy | tutoring | hard |",
                   "mean seq-rep-4", "far more than sft (looping share", "The held-out preference (DPO) loss along each fit"):
        assert needle in report, needle
    # one PRM output and one policy head per family's objective (none declared shared)
    ids = ["assistant/concision", "assistant/thoroughness", "math_word/accuracy", "math_word/engagement",
           "tutoring/accuracy", "tutoring/engagement"]
    assert json.loads((run / "prm" / "model" / "prm_config.json").read_text())["objectives"] == ids
    mah = json.loads((run / "stages" / "fit_policy_mahdpo.json").read_text())["outputs"]["mahdpo"]["model_dir"]
    assert json.loads((Path(mah) / "multihead_config.json").read_text())["objectives"] == ids
    assert (run / "pareto_math_word.png").exists() and (run / "eval" / "scores.parquet").exists()
    # finished fits' Ray Train checkpoints are dropped (keep_train_checkpoints: false); the exports stay
    assert not [p.name for p in (run / "ray").iterdir() if p.name.startswith(("sft", "prm", "policy-"))]
    policies = {r["policy"] for r in out["eval"]["rows"]}
    assert policies == {"base", "sft", "single-head DPO", "DPO soup", "MODPO", "MAH-DPO"}
    answers = json.loads((run / "stages" / "serve.json").read_text())["outputs"]["answers"]
    assert len(answers) == 2 and answers[0]["objective_weights"] != answers[1]["objective_weights"]
    # run again: every stage resumes as done
    main(argv)
    assert "resumed (done earlier)" in (run / "report.md").read_text()


def test_report_says_which_objectives_are_shared_and_labels_by_id():
    """The report's Objectives section (no run needed) and the main job's labelling methods by id."""
    from jobs.main import judged_methods, objectives_section
    from pipeline.config import MainJobConfig

    labels = {"summary": {"d": {"math_word/accuracy": {"steps": 10, "unlabelled": 2, "mean": 0.25, "label_kind": "soft"},
                                "tutoring/accuracy": {"steps": 4, "unlabelled": 0, "mean": 0.5, "label_kind": "hard"}}}}
    text = objectives_section(MainJobConfig(), labels)
    assert text.startswith("Shared objectives: none")
    assert "| math_word/accuracy | math_word | soft | 8 | 0.250 |" in text and "| tutoring/accuracy | tutoring | hard | 4 |" in text
    shared = objectives_section(MainJobConfig(shared_objectives=["accuracy"]), {"summary": {}})
    assert shared.startswith("Shared objectives: accuracy") and "| accuracy | math_word, tutoring | - | 0 | - |" in shared
    # judged methods by id: tutoring's engagement (a dialogue objective) is not labelled as math's judged one
    assert judged_methods("judge_mc", []) == {o: "judge_mc" for o in
                                              ("math_word/engagement", "assistant/thoroughness", "assistant/concision")}
    assert "engagement" not in judged_methods("judge_mc", ["engagement"])  # judge_mc cannot label a dialogue
    assert judged_methods("judge_prefix", ["engagement"])["engagement"] == "judge_prefix"
