"""The Ray Train + DeepSpeed harness and SFT, for real: 2 workers, gloo, ZeRO-2/3, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from conftest import sft_rows
from pipeline.config import SFTJobConfig, TrainConfig, load_config
from pipeline.data.stream import quarantine_count
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.models.tokenize import encode_prompt_completion
from pipeline.models.collate import PadCollate
from pipeline.train.ds_config import deepspeed_config
from pipeline.train.harness import fit, make_scheduler, param_groups, plan_steps, read_metrics
from pipeline.train.sft import build_spec, run_sft, sft_loss


def fixed_batch_dataset(ray, model_dir: str, n: int = 16):
    """One row over and over: every micro-batch is the same fixed batch, so the loss must fall."""
    tok = load_tokenizer(model_dir)
    e = encode_prompt_completion(tok, sft_rows(1)[0]["prompt"], sft_rows(1)[0]["completion"], 128, 64)
    return ray.data.from_items([{"input_ids": e["input_ids"], "labels": e["labels"]}] * n)


def train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(num_workers=2, micro_batch_size=2, lr=2e-3, max_steps=6, checkpoint_every=3, log_every=1,
                storage_path=str(tmp_path / "ray"), tracker={"kind": "tensorboard"}, epochs=20)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("zero", [2, 3])
def test_harness_loss_falls_on_fixed_batch(tmp_path, ray_session, tiny_model_dir, zero):
    cfg = train_cfg(tmp_path, zero_stage=zero, grad_accum=zero - 1)  # ZeRO-3 also accumulates 2 micro-batches
    ds = fixed_batch_dataset(ray_session, tiny_model_dir)
    datasets = {"train": ds, "eval": ds.limit(4)}  # eval under ZeRO-3 needs equal forwards on every rank
    res = fit(build_spec(tiny_model_dir, cfg.bf16), cfg, datasets, run_name=f"z{zero}", num_train_rows=16,
              log_dir=str(tmp_path / "logs"), export_dir=str(tmp_path / "model"))
    losses = [m["loss"] for m in read_metrics(res.log_dir)]
    assert len(losses) == 6 and res.step == 6
    assert losses[-1] < 0.8 * losses[0] and sum(losses[3:]) < sum(losses[:3]), losses
    assert list((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))  # the tracker wrote
    # The export is a plain HF checkpoint whose weights moved away from the start.
    before, after = load_causal_lm(tiny_model_dir, "float32"), load_causal_lm(tmp_path / "model", "float32")
    w0, w1 = before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    assert w1.shape == w0.shape and not torch.allclose(w0, w1)
    assert Path(res.checkpoint).name == "checkpoint-0000006"
    assert res.metrics["eval/loss"] < losses[0]


def distinct_rows_dataset(ray, model_dir: str, n: int = 16):
    """n different rows: a resume that replays or skips the wrong micro-batches trains on other data."""
    tok = load_tokenizer(model_dir)
    enc = [encode_prompt_completion(tok, r["prompt"], r["completion"], 128, 64) for r in sft_rows(n)]
    return ray.data.from_items([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in enc])


def test_resume_after_stop_and_after_worker_failure(tmp_path, ray_session, tiny_model_dir):
    """Run 1 stops after its checkpoint at step 2. Run 2 (same name) resumes there, then a
    worker crashes during step 5 (the second epoch); Ray Train restarts the group, which resumes
    from step 4. Every step is logged exactly once, and the losses and final weights are those
    of one uninterrupted run on the same distinct rows: nothing replayed, skipped or restarted."""
    ds = distinct_rows_dataset(ray_session, tiny_model_dir)  # 4 steps per epoch: 2 workers x 2 micro-batches of 2
    spec = build_spec(tiny_model_dir, True)
    cfg = train_cfg(tmp_path, max_steps=6, checkpoint_every=2)
    straight = fit(spec, cfg, {"train": ds}, run_name="straight", num_train_rows=16,
                   log_dir=str(tmp_path / "straight"), export_dir=str(tmp_path / "straight-model"))

    kw = dict(run_name="resume", num_train_rows=16, log_dir=str(tmp_path / "logs"))
    fit(spec, train_cfg(tmp_path, max_steps=2, checkpoint_every=2), {"train": ds}, **kw)

    marker = tmp_path / "crashed"
    calls = {"n": 0}

    def crash_once(model, batch):  # shipped to the workers by value (cloudpickle)
        calls["n"] += 1
        if calls["n"] == 3 and not marker.exists():  # this attempt's 3rd micro-batch: step 5 (it resumed at 2)
            marker.write_text("x")
            raise RuntimeError("injected worker failure")
        return sft_loss(model, batch)

    spec.loss = crash_once
    res = fit(spec, cfg.model_copy(update={"max_failures": 1}), {"train": ds}, export_dir=str(tmp_path / "model"), **kw)
    assert marker.exists(), "the injected failure never ran"
    raw = [json.loads(x)["step"] for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 3, 4, 5, 6], raw
    assert res.step == 6 and straight.step == 6
    want = [m["loss"] for m in read_metrics(straight.log_dir)]
    assert len(set(want)) == 6, want  # distinct rows: every step sees other data
    assert [m["loss"] for m in read_metrics(res.log_dir)] == pytest.approx(want, rel=1e-5, abs=0)
    a, b = load_causal_lm(tmp_path / "model", "float32"), load_causal_lm(tmp_path / "straight-model", "float32")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_sft_on_tiny_model(tmp_path, ray_session, tiny_model_dir):
    """TRL prompt/completion JSONL in, one bad row quarantined, loss on completions only, HF model out."""
    rows = sft_rows(40) + [{"prompt": "broken row", "completion": None}]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"][0]["content"], "completion": r["completion"]}) + "\n"
                           if "prompt" in r and isinstance(r["prompt"], list) else json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SFTJobConfig, None, {
        "model.name_or_path": tiny_model_dir, "data.paths": [str(src)], "data.skip_bad_rows": True,
        "data.eval_fraction": 0.2, "output_dir": str(tmp_path / "out"), "run_name": "sft-tiny",
        "train.storage_path": str(tmp_path / "ray"), "train.lr": 3e-3, "train.micro_batch_size": 4,
        "train.epochs": 3, "train.checkpoint_every": 100, "sft.max_length": 96, "sft.max_prompt_length": 48,
        "train.checkpoint_at_end": False, "train.export_steps": [2],
    })
    res = run_sft(cfg)
    assert quarantine_count(str(tmp_path / "out" / "quarantine")) == 1
    # checkpoint_at_end false: no DeepSpeed state saved at all (checkpoint_every 100 > steps), the export is
    # the result; export_steps: a snapshot of step 2 beside it
    assert res.checkpoint is None and not list((tmp_path / "ray").glob("sft-tiny/checkpoint-*"))
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert (tmp_path / "out" / "model_step2" / "config.json").exists()
    assert res.metrics["eval/loss"] < read_metrics(res.log_dir)[0]["loss"]

    def completion_loss(model_dir):
        model, tok = load_causal_lm(model_dir, "float32"), load_tokenizer(model_dir)
        enc = [encode_prompt_completion(tok, r["prompt"], r["completion"], 96, 48) for r in sft_rows(8, offset=100)]
        batch = PadCollate(tok.pad_token_id)({k: [e[k] for e in enc] for k in ("input_ids", "labels")})
        with torch.no_grad():
            return sft_loss(model, batch)[0].item()

    assert completion_loss(res.export_dir) < 0.8 * completion_loss(tiny_model_dir)  # learned, on unseen rows


def test_sft_loss_ignores_prompt_tokens(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    enc = encode_prompt_completion(tok, [{"role": "user", "content": "a b c d e f"}], "done", 64, 32)
    batch = PadCollate(tok.pad_token_id)({"input_ids": [enc["input_ids"]], "labels": [enc["labels"]]})
    loss, _ = sft_loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    target = batch["labels"][0, 1:]
    keep = target != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert keep.sum() < len(target) and loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_missing_tracker_package_fails_before_training(tmp_path, monkeypatch, kind):
    """Deterministic whatever is installed: the package is made missing, then present."""
    import importlib.util
    from importlib.machinery import ModuleSpec

    from pipeline.train.tracking import check_tracker

    real = importlib.util.find_spec
    cfg = train_cfg(tmp_path, tracker={"kind": kind})
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == kind else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=f"train.tracker.kind is '{kind}'.*pip install {kind}"):
        check_tracker(cfg.tracker)
    # fit() checks before it plans or builds a trainer (planning raises here if reached first)
    import pipeline.train.harness as harness

    def started(*a):
        raise AssertionError("fit went past the tracker check")

    monkeypatch.setattr(harness, "plan_steps", started)
    with pytest.raises(ModuleNotFoundError, match=f"pip install {kind}"):
        fit(None, cfg, {}, run_name="x", num_train_rows=16, log_dir=str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: ModuleSpec(n, None) if n == kind else real(n, *a))
    check_tracker(cfg.tracker)  # present: passes
    check_tracker(TrainConfig().tracker)  # tensorboard ships with the project
    check_tracker(TrainConfig(tracker={"kind": "none"}).tracker)


def test_plan_and_schedule():
    cfg = TrainConfig(num_workers=2, micro_batch_size=4, grad_accum=2, epochs=3)
    assert plan_steps(100, cfg) == (6, 18)  # 50 rows/worker -> 12 micro-batches -> 6 steps per epoch
    assert plan_steps(100, cfg.model_copy(update={"max_steps": 4})) == (6, 4)
    with pytest.raises(ValueError, match="too few for one optimizer step"):
        plan_steps(10, cfg)
    # transformers' convention: warmup from lr 0 (step/warmup), then the schedule down to 0 at the last step
    want = {"constant": [0.0, 0.5, 1.0, 1.0, 1.0], "linear": [0.0, 0.5, 1.0, 0.5, 0.0],
            "cosine": [0.0, 0.5, 1.0, 0.5, 0.0]}
    for name, lrs in want.items():
        for warmup in (0, 2):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
            sched = make_scheduler(opt, TrainConfig(warmup_steps=warmup, lr_schedule=name), total_steps=12)
            seen = []
            for s in range(13):
                seen.append(round(sched.get_last_lr()[0] / 2.0, 3))
                opt.step()
                sched.step()
            got = [seen[s] for s in (0, 1, 2, 7, 12)]
            if warmup:
                assert got == lrs, (name, got)
            else:
                assert got[0] == 1.0 and got[-1] == lrs[-1], (name, got)
    assert seen[3] == pytest.approx(0.976, abs=1e-3)  # cosine, not linear, after warmup
    ds = deepspeed_config(TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum=4, deepspeed={"bf16": {"enabled": False}}), 8)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": False}


def _mean_worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from pipeline.train.harness import _mean_across_workers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 saw objective b, rank 1 did not (a PRM micro-batch without its labels)
    got = _mean_across_workers({"loss": 1.0 + rank, **({"b": 4.0} if rank == 0 else {})}, "cpu")
    out.put((rank, got))
    dist.destroy_process_group()


def test_fresh_parameters_get_their_own_learning_rate():
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    groups = param_groups(model, TrainConfig(lr=1e-5, fresh_lr=1e-3), ("head.",))
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["lr"] == 1e-3
    assert all(p is q for p, q in zip(groups[1]["params"], model["head"].parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-5)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-3]
    # unset: one group at lr, as before
    assert [len(g["params"]) for g in param_groups(model, TrainConfig(lr=1e-5), ("head.",))] == [4]


def test_named_parameters_get_their_own_learning_rate():
    """dpo.head_lr: loaded parameters matched by the last component of their name (a soup member's too);
    frozen ones stay out of every group."""
    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(4, 4)
            self.heads = torch.nn.Parameter(torch.zeros(2, 3, 4))
    soup = torch.nn.ModuleDict({"members": torch.nn.ModuleList([Policy(), Policy()])})
    soup["members"][1].base.bias.requires_grad_(False)
    groups = param_groups(soup, TrainConfig(lr=1e-4), (), {"heads": 5e-4})
    assert [len(g["params"]) for g in groups] == [3, 2] and "lr" not in groups[0] and groups[1]["lr"] == 5e-4
    assert {id(p) for p in groups[1]["params"]} == {id(m.heads) for m in soup["members"]}
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-4]
    # a bias or weight named like nothing in named_lrs: the default group
    assert [len(g["params"]) for g in param_groups(soup, TrainConfig(lr=1e-4), (), {"gamma": 1.0})] == [5]


def test_metric_averaging_reads_tensors_once_per_logged_step(monkeypatch):
    """Tensor metrics stay on their device across micro-batches (no .item() per micro-batch: a host sync
    on a GPU); the mean is read when the step is logged. A collate's own token counts win over the mask
    and never reach the loss."""
    from pipeline.train.harness import _Averager, _count_tokens

    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    avg = _Averager()
    for v in (1.0, 2.0, 4.0):
        avg.add({"loss": torch.tensor(v), "n": 3})
    avg.add({"loss": torch.tensor([1.0, 1.0])})  # a per-row metric: its sum
    assert reads == [] and torch.is_tensor(avg.sums["loss"])
    assert avg.mean() == {"loss": 9.0 / 4, "n": 3.0}
    packed = {"input_ids": torch.ones(1, 7, dtype=torch.long), "num_tokens": (7, 7)}
    assert _count_tokens(packed) == (7, 7) and "num_tokens" not in packed
    assert _count_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == (3, 6)


def test_metrics_with_different_keys_per_worker_average_over_those_that_have_them():
    """Regression: ranks with different metric keys once ran mismatched all_reduces and aborted gloo."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_mean_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert res[0] == res[1] == {"b": 4.0, "loss": 1.5}


def test_auroc_equals_pairwise_count_with_ties():
    """AUROC = P(score of a positive > score of a negative) + half the ties, by brute force."""
    import numpy as np

    from pipeline.train.prm_metrics import auroc

    rng = np.random.default_rng(0)
    for n in (2, 7, 40, 200):
        scores = rng.integers(0, 5, n).astype(np.float64)  # few distinct values: many ties
        labels = rng.integers(0, 2, n).astype(np.float64)
        labels[:2] = [0, 1]
        pos, neg = scores[labels == 1], scores[labels == 0]
        brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
        assert auroc(scores, labels) == pytest.approx(brute, abs=1e-12), n
        assert auroc(-scores, labels) == pytest.approx(1 - brute, abs=1e-12)


def test_a_resume_drops_the_metric_lines_of_the_steps_it_redoes(tmp_path):
    """A checkpoint written in the last seconds before a failure may not be the one Ray Train resumes from:
    the steps after the resumed one run again, and were logged twice (issue 20)."""
    from pipeline.train.harness import read_metrics, truncate_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)))
    assert truncate_metrics(str(f), 4) == 4
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert truncate_metrics(str(f), 4) == 0 and truncate_metrics(str(tmp_path / "none.jsonl"), 0) == 0
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_a_checkpoint_uploaded_but_not_yet_registered_is_resumed_from(tmp_path, ray_session, tiny_model_dir):
    """Ray Train's controller registers a reported checkpoint up to ~2 s after every rank uploaded it; a
    failure in that window resumed one checkpoint interval further back. Every rank now marks its upload
    done, and a resume takes the newest checkpoint all ranks marked. Simulated: a copy of the registered
    step-2 checkpoint, renamed and relabelled as step 4, stands for the unregistered one."""
    import shutil

    from pipeline.train.harness import REPORTED, newest_reported_checkpoint

    ds = distinct_rows_dataset(ray_session, tiny_model_dir)
    spec = build_spec(tiny_model_dir, True)
    kw = dict(run_name="late", num_train_rows=16, log_dir=str(tmp_path / "logs"))
    fit(spec, train_cfg(tmp_path, max_steps=2, checkpoint_every=2), {"train": ds}, **kw)
    run_dir = tmp_path / "ray" / "late"
    two = run_dir / "checkpoint-0000002"
    assert sorted(p.name for p in two.glob(REPORTED + "*")) == [f"{REPORTED}0", f"{REPORTED}1"]
    four = run_dir / "checkpoint-0000004"
    shutil.copytree(two, four)
    state = json.loads((four / "trainer_state.json").read_text())
    (four / "trainer_state.json").write_text(json.dumps({**state, "step": 4, "epoch": 1, "micro_in_epoch": 0}))
    (four / f"{REPORTED}1").unlink()  # rank 1 not done uploading: incomplete, not taken
    assert newest_reported_checkpoint(run_dir) == two
    (four / f"{REPORTED}1").write_text("2")
    assert newest_reported_checkpoint(run_dir) == four
    res = fit(spec, train_cfg(tmp_path, max_steps=6, checkpoint_every=2), {"train": ds}, **kw)
    raw = [json.loads(x)["step"] for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert raw == [1, 2, 5, 6] and res.step == 6, raw  # resumed at 4, not at Ray Train's registered 2
