"""On-the-fly reference log-probs under ZeRO-3 (`dpo.recompute_ref`, or pairs without cached values): the
reference is a plain, unpartitioned model in every worker, so MAH-DPO trains the same as with cached
reference log-probs, also when only one rank's batch needs the reference."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_zero3_mahdpo_cached_and_recomputed_reference_agree(tmp_path, ray_session, tiny_model_dir):
    from jobs.fit_policy import main as fit_policy
    from pipeline.data import write_records
    from pipeline.models.ref_logps import RefLogps
    from pipeline.train.harness import read_metrics

    rows = []
    for i in range(8):  # 4 pairs of each of 2 objectives -> 2 heads, 4 balanced groups
        rows.append({"id": f"x{i}", "prompt": [{"role": "user", "content": f"Say something about {i}."}],
                     "chosen": f"Sure, {i} is good.", "rejected": "no", "objective": "acc" if i % 2 else "eng"})
    chosen, rejected = RefLogps(tiny_model_dir, max_length=48, max_prompt_length=24).logps(rows)
    for row, a, b in zip(rows, chosen, rejected):
        row.update(ref_chosen_logp=a, ref_rejected_logp=b)
    write_records(rows, tmp_path / "pairs" / "pairs-00000.parquet", "preference")
    # one pair without cached values: the step that trains its group computes the reference on one rank only
    mixed = [dict(r, ref_chosen_logp=None, ref_rejected_logp=None) if r["id"] == "x0" else r for r in rows]
    write_records(mixed, tmp_path / "mixed" / "pairs-00000.parquet", "preference")

    def fit(name, *extra, data="pairs"):
        fit_policy(["--model.name_or_path", tiny_model_dir, "--data.paths", f"[{tmp_path / data}]",
                    "--dpo.max_length", "48", "--dpo.max_prompt_length", "24", "--dpo.ref_dtype", "float32",
                    "--train.storage_path", str(tmp_path / "ray"), "--train.tracker.kind", "none",
                    "--train.lr", "1e-3", "--train.bf16", "false", "--train.zero_stage", "3",
                    "--train.num_workers", "2", "--train.micro_batch_size", "1", "--train.grad_accum", "1",
                    "--train.warmup_steps", "0", "--data.eval_fraction", "0", "--train.max_steps", "2",
                    "--train.checkpoint_every", "2", "--run_name", name, "--output_dir", str(tmp_path / name), *extra])
        return read_metrics(str(tmp_path / name / "logs"))

    cached = fit("cached")
    fly = fit("fly", "--dpo.recompute_ref", "true")
    part = fit("part", data="mixed")
    assert [m["step"] for m in cached] == [m["step"] for m in fly] == [m["step"] for m in part] == [1, 2]
    # Both references are the SFT model in float32; only the padding differs (one batch of 8 vs micro-batches
    # of 1): <1e-5 on a pair's log-prob margin, <1e-6 on a loss (beta 0.1). Measured: a bf16 reference moves
    # the margins by ~1e-2 and the losses by ~3e-4, so these tolerances tell the two apart.
    for a, b, c in zip(cached, fly, part):  # step 2: after an update
        for k in ("loss", "acc/loss", "eng/loss", "acc/margin", "eng/margin"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), ("recomputed", a["step"], k)
            assert c[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), ("partly cached", a["step"], k)


def test_whole_models_switches_zero3_init_off_only_inside():
    """Fast guard for the mechanism: transformers sees no ZeRO-3 config inside whole_models() (nested
    too), the live one again after; check_whole refuses a partitioned parameter."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from pipeline.train.harness import check_whole, whole_models

    live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with whole_models():
            assert not is_deepspeed_zero3_enabled()
            with whole_models():
                assert not is_deepspeed_zero3_enabled()
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled() and live.is_zero3()
    finally:
        unset_hf_deepspeed_config()  # no global state leaks into other tests
    m = torch.nn.Linear(2, 2)
    check_whole(m, "plain")
    m.weight.ds_id = 0  # what zero.Init tags a partitioned parameter with
    with pytest.raises(RuntimeError, match="reference: 1 parameters are ZeRO-3 partitioned"):
        check_whole(m, "reference")
