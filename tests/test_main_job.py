"""The main job end to end, quick profile: every stage on local Ray with SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

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
                   "Why, from this run's data", "- Floor: the SFT policy scores 0 on", "MODPO"):
        assert needle in report, needle
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
