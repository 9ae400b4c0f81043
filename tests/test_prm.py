"""The vectorized PRM's pieces: label placement at separators (with truncation), masking of
missing labels, each loss against a hand-computed value, a multi-objective batch, save/load."""

import json
import math

import pytest
import torch

from pipeline.models.prm import VectorPRM, build_prm, encode_steps
from pipeline.train.prm_losses import bradley_terry, combine, masked_step_losses, outcome_pairs

PROMPT = [{"role": "user", "content": "What is 3 + 4 + 5?"}]
STEPS = ["3 + 4 = 7.", "7 + 5 = 12.", "The answer is 12."]


@pytest.fixture(scope="module")
def prm(tiny_model_dir):
    return build_prm(tiny_model_dir, ["accuracy", "engagement"], {"accuracy": "soft", "engagement": "hard"})


def test_labels_sit_at_separators(prm):
    model, tok = prm
    enc = encode_steps(tok, PROMPT, STEPS, model.sep_id, max_length=256, labels=[[0.5, 1], [0.7, None], [1.0, 0]])
    assert len(enc["positions"]) == 3 and all(enc["input_ids"][p] == model.sep_id for p in enc["positions"])
    assert enc["input_ids"].count(model.sep_id) == 3  # nowhere else
    assert tok.decode(enc["input_ids"][enc["positions"][0] - 5 : enc["positions"][0]]).endswith("= 7.")
    assert math.isnan(enc["labels"][1][1]) and enc["labels"][2] == [1.0, 0.0]


def test_truncation_drops_cut_steps_with_their_labels(prm):
    model, tok = prm
    full = encode_steps(tok, PROMPT, STEPS, model.sep_id, max_length=256)
    cut = full["positions"][1] + 1  # room for steps 1-2 only
    enc = encode_steps(tok, PROMPT, STEPS, model.sep_id, max_length=cut, labels=[[1, 1], [2, 2], [3, 3]])
    assert enc["positions"] == full["positions"][:2] and enc["labels"] == [[1, 1], [2, 2]] and enc["n_steps"] == 3
    assert len(enc["input_ids"]) <= cut


def test_missing_labels_are_masked_not_zero():
    pred = torch.tensor([[[0.2, 2.0], [0.4, -1.0]]], requires_grad=True)
    labels = torch.tensor([[[1.0, float("nan")], [float("nan"), 0.0]]])
    losses = masked_step_losses(pred, labels, ["soft", "hard"])
    assert losses[0].item() == pytest.approx((0.2 - 1.0) ** 2)  # only the labelled step
    assert losses[1].item() == pytest.approx(-math.log(1 - torch.sigmoid(torch.tensor(-1.0)).item()))
    combine(losses, [1.0, 1.0]).backward()
    assert pred.grad[0, 1, 0] == 0 and pred.grad[0, 0, 1] == 0  # masked steps get no gradient
    assert masked_step_losses(pred, torch.full_like(labels, float("nan")), ["soft", "hard"]) == {}


def test_losses_against_hand_computed_values():
    pred = torch.tensor([[[0.5], [0.9]]])
    assert masked_step_losses(pred, torch.tensor([[[1.0], [0.0]]]), ["soft"])[0].item() == pytest.approx(
        ((0.5 - 1) ** 2 + 0.9 ** 2) / 2)
    p = torch.tensor([[[2.0]]])
    bce = -math.log(1 / (1 + math.exp(-2.0)))
    assert masked_step_losses(p, torch.tensor([[[1.0]]]), ["hard"])[0].item() == pytest.approx(bce)
    r = torch.tensor([1.5, 0.5, -0.5])
    pairs = torch.tensor(outcome_pairs(["a", "a", "a"], [1.0, 0.5, 0.0]))
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    expected = -sum(math.log(1 / (1 + math.exp(-(r[w] - r[l]).item()))) for w, l in pairs.tolist()) / 3
    assert bradley_terry(r, pairs).item() == pytest.approx(expected)
    assert outcome_pairs(["a", "b"], [1.0, 0.0]) == []  # only responses to the same prompt pair up


def test_multi_objective_batch_and_weights(prm):
    model, tok = prm
    rows = [encode_steps(tok, PROMPT, STEPS, model.sep_id, 256, labels=[[0.5, None]] * 3),
            encode_steps(tok, PROMPT, STEPS[:2], model.sep_id, 256, labels=[[None, 1.0]] * 2)]
    width, n = max(len(r["input_ids"]) for r in rows), max(len(r["positions"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    pos = torch.tensor([r["positions"] + [0] * (n - len(r["positions"])) for r in rows])
    smask = torch.tensor([[1.0] * len(r["positions"]) + [0.0] * (n - len(r["positions"])) for r in rows])
    lab = torch.tensor([r["labels"] + [[float("nan")] * 2] * (n - len(r["labels"])) for r in rows])
    out = model.step_rewards(ids, att, pos, smask)
    assert out.shape == (2, 3, 2)
    losses = masked_step_losses(out, lab, ["soft", "hard"])
    assert set(losses) == {0, 1}  # one row per objective, both trained in one batch
    total = combine(losses, [2.0, 1.0])
    assert total.item() == pytest.approx((2 * losses[0].item() + losses[1].item()) / 3)
    total.backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_save_load_round_trip(prm, tmp_path):
    model, tok = prm
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    model.save(tmp_path / "prm", tokenizer=tok)
    again, tok2 = VectorPRM.load(tmp_path / "prm")
    assert again.objectives == ["accuracy", "engagement"] and again.label_kinds["engagement"] == "hard"
    enc = encode_steps(tok2, PROMPT, STEPS, again.sep_id, 256)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids), again(ids), atol=1e-6)


def test_metrics_against_hand_computed_values():
    import numpy as np

    from pipeline.train.prm_metrics import auroc, objective_metrics

    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    m = objective_metrics("soft", np.array([0.1, 0.9, 5.0]), np.array([0.0, 1.0, float("nan")]))
    assert m["mse"] == pytest.approx(0.01) and m["mse_mean_baseline"] == pytest.approx(0.25) and m["n"] == 2
    h = objective_metrics("hard", np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, 0.0]))
    assert h["step_accuracy"] == pytest.approx(2 / 3) and h["auroc"] == 1.0
    assert h["majority_baseline"] == pytest.approx(2 / 3) and h["mse_mean_baseline"] == pytest.approx(2 / 9)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert h["mse"] == pytest.approx(((sig(2) - 1) ** 2 + sig(-1) ** 2 + sig(0.5) ** 2) / 3)
    from pipeline.train.prm_metrics import versus_baselines

    from pipeline.train.prm_metrics import auroc_se

    # Hanley and McNeil at A = 0.5: SE^2 = (1/4 + (n1 + n0 - 2) / 12) / (n1 n0)
    assert auroc_se(0.5, 10, 10) == pytest.approx(math.sqrt((0.25 + 18 / 12) / 100))
    assert math.isnan(auroc_se(0.7, 0, 5))
    bad = objective_metrics("hard", np.array([-2.0, 1.0]), np.array([1.0, 0.0]))  # ranked the wrong way round
    vs = {r["objective"]: r for r in versus_baselines({f"eval/good/{k}": v for k, v in h.items()}
                                                      | {f"eval/soft/{k}": v for k, v in m.items()}
                                                      | {f"eval/bad/{k}": v for k, v in bad.items()})}
    assert vs["good"]["beats_baselines"] is True and vs["good"]["mse"] < vs["good"]["mse_mean_baseline"]
    assert vs["soft"]["beats_baselines"] is True and vs["soft"]["n"] == 2
    assert vs["bad"]["beats_baselines"] is False and vs["bad"]["auroc"] == 0.0
    o = objective_metrics("outcome", np.array([3.0, 1.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.0, 1.0]), np.array([7, 7, 9, 9]))
    assert o["pairwise_accuracy"] == 0.5 and o["n"] == 2


def test_fit_prm_job_and_batch_scorer(tmp_path, ray_session, tiny_model_dir):
    """jobs.fit_prm on stepwise shards with three objectives (soft + hard, separate rows merged per
    response, + an outcome objective over two responses per prompt, grouped per prompt) on 2 workers
    under ZeRO-3 (embedding resize and head under zero.Init): the loss falls, held-out metrics per
    objective (and the linear probe's that started the head), the outcome pairs counted, the best
    model kept; then the batch scorer writes rewards() (the common scale)."""
    import pyarrow as pa

    from jobs.fit_prm import main
    from pipeline.data import write_records
    from pipeline.models.prm import PRMScorer
    from pipeline.train.harness import read_metrics
    from pipeline.data.split import held_out
    from pipeline.train.prm import merge_stepwise

    rows = []
    for i in range(24):
        # accuracy labels follow the step's content (right or wrong sum), not its position: over the 24
        # responses each position is right in half of them, so only a PRM that reads the steps ranks them
        ok = [(i >> j) & 1 == 1 for j in range(3)]
        steps = [f"{i + j} + 1 = {i + j + 1}." if ok[j] else f"{i + j} + 1 = {i + j + 7}, a slip." for j in range(3)]
        p = [{"role": "user", "content": f"What is {i} + 3?"}]
        rows.append({"id": f"a{i}", "prompt": p, "completions": steps, "objective": "accuracy",
                     "labels": [0.9 if o else 0.1 for o in ok], "label_kind": "soft", "rollouts_per_step": 4})
        rows.append({"id": f"e{i}", "prompt": p, "completions": steps, "objective": "engagement",
                     "labels": [1.0, None, float(i % 2)], "label_kind": "hard", "rollouts_per_step": 4})
        for k, (resp, z) in enumerate([(steps, 1.0), ([f"{i} + 2 = {i + 3}.", f"The answer is {i + 3}."], 0.0)]):
            rows.append({"id": f"o{i}-{k}", "prompt": p, "completions": resp, "objective": "preference",
                         "labels": [None] * (len(resp) - 1) + [z], "label_kind": "soft", "rollouts_per_step": 0})
    assert merge_stepwise(rows[:2], ["accuracy", "engagement"])[0]["labels"][1] == [0.1, None]
    write_records(rows[:48], tmp_path / "labels" / "part-0.parquet", "stepwise")
    write_records(rows[48:], tmp_path / "labels" / "part-1.parquet", "stepwise")
    res = main(["--model.name_or_path", tiny_model_dir, "--data.paths", f"[{tmp_path / 'labels'}]",
                "--data.eval_fraction", "0.25", "--output_dir", str(tmp_path / "prm"), "--outcome_objectives", "[preference]",
                "--train.storage_path", str(tmp_path / "ray"), "--train.num_workers", "2",
                # 2e-4 for 24 steps: at 5e-4 for 12 the loss jumped to 16 at step 2 and the last model ranked the
                # steps at AUROC 0.87 (CI, 2026-12-01); here 0.98
                "--train.lr", "2e-4",
                "--train.zero_stage", "3",
                "--train.micro_batch_size", "2", "--train.max_steps", "24", "--train.epochs", "20",
                "--train.checkpoint_every", "6", "--train.tracker.kind", "none",
                "--train.best_metric", "eval/accuracy/mse"])
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "prm" / "logs"))]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert {"eval/accuracy/mse", "eval/accuracy/mse_mean_baseline", "eval/engagement/auroc",
            "eval/engagement/step_accuracy", "probe/accuracy/mse", "probe/engagement/auroc",
            "eval/preference/pairwise_accuracy"} <= set(res.metrics)
    assert res.metrics["eval/accuracy/auroc"] > 0.75 and res.metrics["probe/accuracy/auroc"] > 0.75, res.metrics
    n_train = sum(not held_out(json.dumps(r["prompt"]), 0.25) for r in rows if r["id"].startswith("a"))
    assert res.metrics["outcome_pairs/preference"] == n_train  # one pair per training prompt
    assert (tmp_path / "prm" / "model_best" / "prm_head.safetensors").exists()
    tok_report = json.loads((tmp_path / "prm" / "tokenization.json").read_text())
    assert res.metrics["duplicate_rows"] == 0 and res.metrics["steps_cut/train"] == 0  # every step fits 768 tokens
    assert tok_report["train"]["steps"] + tok_report["eval"]["steps"] == 24 * (3 + 2)  # one of each response

    model, tok = VectorPRM.load(tmp_path / "prm" / "model")
    # content, not position: every position is right in half the responses, so a PRM that read only
    # the position would rank the 72 steps at AUROC ~0.5
    import numpy as np

    from pipeline.train.prm_metrics import auroc

    acc = [r for r in rows if r["id"].startswith("a")]
    pred = torch.cat([model.score(tok, r["prompt"], r["completions"])[:, 0] for r in acc]).numpy()
    assert auroc(pred, np.array([x > 0.5 for r in acc for x in r["labels"]], dtype=float)) > 0.9
    table = pa.Table.from_pylist([{"prompt": r["prompt"], "steps": r["completions"]} for r in rows[:8:4]])
    scored = PRMScorer(str(tmp_path / "prm" / "model"))(table)
    direct = model.rewards(tok, rows[0]["prompt"], rows[0]["completions"])
    assert direct.shape == (3, 3) and torch.equal(direct, model.to_rewards(model.score(tok, rows[0]["prompt"], rows[0]["completions"])))
    assert torch.allclose(torch.tensor(scored.column("step_rewards").to_pylist()[0]), direct, atol=1e-4)
    ds = ray_session.data.from_arrow(table).map_batches(PRMScorer, fn_constructor_kwargs={"prm_dir": str(tmp_path / "prm" / "model")},
                                                        batch_format="pyarrow", concurrency=1)
    assert [len(r["step_rewards"]) for r in ds.take_all()] == [3, 3]


def test_external_placeholder_prm_wraps_as_one_objective(tmp_path, tiny_model_dir):
    """A stand-in for Qwen2.5-Math-PRM (no hub here): a token-classification model whose
    tokenizer has "<extra_0>"; scores are read at the placeholders as P(class 1)."""
    from transformers import AutoConfig, LlamaForTokenClassification

    from pipeline.models import load_tokenizer
    from pipeline.models.prm import ExternalPRM, add_separator

    tok = load_tokenizer(tiny_model_dir)
    add_separator(tok, "<extra_0>")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels, cfg.vocab_size = 2, len(tok)
    cfg.architectures = ["LlamaForTokenClassification"]
    torch.manual_seed(0)
    LlamaForTokenClassification(cfg).save_pretrained(tmp_path / "ext")
    tok.save_pretrained(tmp_path / "ext")
    ext = ExternalPRM(str(tmp_path / "ext"))
    assert type(ext.model).__name__ == "LlamaForTokenClassification"
    s = ext.score(PROMPT, STEPS)
    assert s.shape == (3,) and ((s > 0) & (s < 1)).all()
    assert torch.equal(ext.rewards(PROMPT, STEPS), s)  # a probability is already on the common scale
    ext.score_kind = "logit"  # a raw logit goes through the sigmoid
    assert torch.allclose(ext.rewards(PROMPT, STEPS), torch.sigmoid(ext.score(PROMPT, STEPS)))
    with pytest.raises(ValueError, match="score 'odds'"):
        ExternalPRM(str(tmp_path / "ext"), score="odds")
    assert torch.isnan(ext.score(PROMPT, STEPS, max_length=len(tok(tok.apply_chat_template(
        PROMPT, tokenize=False, add_generation_prompt=True))["input_ids"]) + 8)[-1])  # cut step: NaN, not a score


def test_micro_batch_without_labels_gives_a_zero_loss_not_a_crash(tiny_model_dir):
    """Every step cut by max_length (or every label missing): the rank still steps with loss 0."""
    import numpy as np

    from pipeline.train.prm import build_spec

    spec = build_spec(tiny_model_dir, ["accuracy"], ["hard"])
    model = spec.build_model()
    def rows(x):  # one array per row, as Ray Data hands them
        a = np.empty(1, dtype=object)
        a[0] = x
        return a

    batch = {"input_ids": rows(np.arange(5)), "positions": rows(np.array([], dtype=np.int32)),
             "labels": rows(np.array([], dtype=np.float32)), "prompt_hash": np.array([3])}
    loss, metrics = spec.loss(model, spec.collate(batch))
    loss.backward()
    assert loss.item() == 0.0 and metrics == {}


def test_head_starts_at_the_trivial_baseline(tiny_model_dir):
    from pipeline.train.prm import label_priors

    # label vectors per step, [acc, eng, pref]; None: no label
    examples = [{"labels": [[0.2, 1.0, None], [0.4, 0.0, 3.0], [None, 0.0, None]]},
                {"labels": [[0.0, 0.0, None]]}]
    priors = label_priors(examples, ["soft", "hard", "outcome"])
    assert priors == pytest.approx([0.2, math.log(0.25 / 0.75), 0.0])
    model, tok = build_prm(tiny_model_dir, ["acc", "eng", "pref"], {"acc": "soft", "eng": "hard", "pref": "outcome"},
                           head={"bias": priors})
    enc = encode_steps(tok, [{"role": "user", "content": "Q?"}], ["one", "two words", "three"], model.sep_id, 256)
    with torch.no_grad():
        out = model(torch.tensor([enc["input_ids"]]), positions=torch.tensor([enc["positions"]]))[0]
    # every step predicts the prior: the mean (soft), the positive rate (hard, through the sigmoid)
    assert torch.allclose(out, torch.tensor(priors).expand(3, -1), atol=1e-6)
    assert torch.sigmoid(out[0, 1]).item() == pytest.approx(0.25)


def test_linear_probe_head_ranks_past_outlier_dimensions():
    """The probe (LP-FT start) on features like SmolLM2's: one huge dimension that carries no
    label and a small one that does. Fitted on standardised features and returned in the raw
    space, the head ranks held-out steps by the small dimension for a hard and a soft objective;
    an objective with one class keeps zero weights and its prior."""
    import numpy as np

    from pipeline.train.prm_metrics import auroc
    from pipeline.train.prm_probe import fit_head

    rng = np.random.default_rng(0)

    def data(n):
        x = rng.normal(size=(n, 6))
        x[:, 0] = 40 + 10 * x[:, 0]  # outlier dimension, no signal
        x[:, 1] *= 0.05  # the signal, at 1/200 of the outlier's scale
        y = np.stack([(x[:, 1] > 0).astype(float), 0.5 + 4 * x[:, 1], np.zeros(n)], 1)
        y[: n // 3, 1] = np.nan  # missing labels are skipped, not read as 0
        return x, y

    x, y = data(300)
    weight, bias = fit_head(x, y, ["hard", "soft", "hard"], c=1.0, priors=[0.0, 0.5, -3.0])
    xt, yt = data(200)
    pred = xt @ weight.T + bias
    assert auroc(pred[:, 0], yt[:, 0]) > 0.95
    keep = ~np.isnan(yt[:, 1])
    assert np.mean((pred[keep, 1] - yt[keep, 1]) ** 2) < 0.1 * np.var(yt[keep, 1])
    assert not weight[2].any() and bias[2] == -3.0


def test_separator_embedding_is_the_same_in_every_build(tiny_model_dir):
    """A probe fitted on one build's features must meet the same features in the workers'
    builds: the added SEP row is the mean embedding, not a random draw."""
    a, _ = build_prm(tiny_model_dir, ["acc"], {"acc": "soft"})
    b, _ = build_prm(tiny_model_dir, ["acc"], {"acc": "soft"})
    ea, eb = a.backbone.get_input_embeddings().weight, b.backbone.get_input_embeddings().weight
    assert torch.equal(ea[a.sep_id], eb[b.sep_id])
    assert torch.allclose(ea[a.sep_id], ea[: a.sep_id].mean(0))


def test_probe_features_are_the_heads_inputs(tiny_model_dir):
    """The probe reads, in padded batches, the same hidden states the head reads at each SEP
    (checked through the head: features x weight + bias == score()), labels in step order."""
    from pipeline.train.prm_probe import step_features

    model, tok = build_prm(tiny_model_dir, ["a", "b"], {"a": "soft", "b": "hard"})
    model.eval()
    ex = [{"prompt": [{"role": "user", "content": f"Q{i}?" * (i + 1)}], "completions": ["one two", "three"][: 1 + i % 2],
           "labels": [[0.25 * i, None], [None, 1.0]][: 1 + i % 2]} for i in range(5)]
    x, y = step_features(model, tok, ex, 256, batch_size=3)  # batches of different lengths
    ref = torch.cat([model.score(tok, e["prompt"], e["completions"]) for e in ex])
    assert torch.allclose(torch.tensor(x, dtype=torch.float32) @ model.head.weight.T + model.head.bias, ref, atol=1e-4)
    assert y[:, 0][~torch.isnan(torch.tensor(y[:, 0])).numpy()].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert y[:, 1][~torch.isnan(torch.tensor(y[:, 1])).numpy()].tolist() == [1.0, 1.0]


def test_reward_links_map_each_kind_to_the_common_scale(prm):
    """soft: clamped to [0, 1]; hard and outcome: sigmoid; NaN stays NaN; per objective in head order."""
    from pipeline.models.prm import reward_link

    x = torch.tensor([-2.0, 0.3, 1.7, float("nan")])
    assert torch.equal(reward_link("soft", x)[:3], torch.tensor([0.0, 0.3, 1.0]))
    for kind in ("hard", "outcome"):
        assert torch.allclose(reward_link(kind, x)[:3], torch.sigmoid(x[:3]))
    assert all(torch.isnan(reward_link(k, x)[3]) for k in ("soft", "hard", "outcome"))
    with pytest.raises(ValueError, match="unknown label kind 'ranked'"):
        reward_link("ranked", x)
    model, tok = prm  # accuracy soft, engagement hard
    raw = torch.tensor([[1.4, 2.0], [-0.1, -3.0]])
    assert torch.allclose(model.to_rewards(raw), torch.tensor([[1.0, torch.sigmoid(torch.tensor(2.0))],
                                                               [0.0, torch.sigmoid(torch.tensor(-3.0))]]))
    assert torch.allclose(model.rewards(tok, PROMPT, STEPS), model.to_rewards(model.score(tok, PROMPT, STEPS)))
    with pytest.raises(ValueError, match="3 is not the PRM's 2"):
        model.to_rewards(torch.zeros(1, 3))


def _outcome_examples():
    """Two prompts x 3 responses with distinct outcome labels (on the last step) and a soft-only
    response of each prompt; objectives [acc (soft), pref (outcome)]."""
    import json

    out = []
    for p in range(2):
        prompt = [{"role": "user", "content": f"Question {p}?"}]
        for r, z in enumerate([1.0, 0.5, 0.0]):
            out.append({"prompt": prompt, "prompt_key": json.dumps(prompt), "completions": [f"Answer {p}.{r} begins.", "Ends."],
                        "labels": [[0.5, None], [None, z]]})
        out.append({"prompt": prompt, "prompt_key": json.dumps(prompt), "completions": ["Soft only."], "labels": [[0.25, None]]})
    return out


def _ray_batch(rows: list[dict]) -> dict:
    """A numpy micro-batch as Ray Data hands it (object arrays of arrays)."""
    import pyarrow as pa

    t = pa.Table.from_pylist(rows)
    return {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}


def test_outcome_pairs_of_a_prompt_all_train_together(tiny_model_dir, monkeypatch):
    """Responses with an outcome label are grouped per prompt into one row, so whatever the shuffle
    and micro-batch size, an epoch's Bradley-Terry loss sees every pair of every prompt (flat rows in
    shuffled micro-batches pair up only by chance); soft-only responses stay rows of one."""
    import random

    import pyarrow as pa

    import pipeline.train.prm as prm_train
    from pipeline.train.prm import build_spec, group_examples, tokenize_prm

    groups = group_examples(_outcome_examples(), ["soft", "outcome"])
    assert [len(g["responses"]) for g in groups] == [3, 1, 3, 1]
    rows = tokenize_prm(pa.Table.from_pylist(groups), tiny_model_dir, "<|step|>", 256).to_pylist()
    spec = build_spec(tiny_model_dir, ["acc", "pref"], ["soft", "outcome"])
    model = spec.build_model()
    seen = []
    real = prm_train.bradley_terry

    def spy(last, pairs):  # (prompt, winner's label, loser's label) of every pair the loss trains on
        seen.extend((int(batch["prompt_hash"][w]), float(z[w]), float(z[l])) for w, l in pairs.tolist())
        return real(last, pairs)

    monkeypatch.setattr(prm_train, "bradley_terry", spy)
    for size in (1, 2):
        order = list(range(len(rows)))
        random.Random(size).shuffle(order)
        seen.clear()
        for i in range(0, len(order), size):
            batch = spec.collate(_ray_batch([rows[k] for k in order[i: i + size]]))
            last = batch["step_mask"].sum(1).long() - 1
            z = batch["labels"][torch.arange(len(last)), last, 1]
            loss, metrics = spec.loss(model, batch)
            loss.backward()
        hashes = sorted({h for h, _, _ in seen})
        want = sorted((h, a, b) for h in hashes for a in (1.0, 0.5, 0.0) for b in (1.0, 0.5, 0.0) if a > b)
        assert len(hashes) == 2 and sorted(seen) == want  # 3 pairs per prompt, each once
    assert "loss/pref" in metrics and "loss/acc" in metrics


def test_outcome_pairs_are_counted_and_an_objective_without_pairs_is_refused(caplog):
    import logging

    from pipeline.train.prm import check_outcome_pairs, group_examples

    ex = _outcome_examples()
    kinds = ["soft", "outcome"]
    with caplog.at_level(logging.INFO, logger="pipeline.train.prm"):
        assert check_outcome_pairs(group_examples(ex, kinds), ["acc", "pref"], kinds) == {"pref": 6}
    assert "fit_prm: pref (outcome): 6 pairs from 2 prompts" in caplog.text
    for e in ex:  # the same outcome for every response of a prompt: nothing to rank
        if e["labels"][-1][1] is not None:
            e["labels"][-1][1] = 1.0
    with pytest.raises(ValueError, match="outcome objective 'pref' has no Bradley-Terry pair"):
        check_outcome_pairs(group_examples(ex, kinds), ["acc", "pref"], kinds)


def test_duplicate_stepwise_rows_are_averaged_and_counted():
    """Two trajectories sampled alike give two rows of one (objective, prompt, steps): the later used to
    overwrite the earlier without a word; now their labels are averaged (more rollouts of the same
    prefixes) and the repeat is counted."""
    from pipeline.train.prm import merge_stepwise

    p = [{"role": "user", "content": "2 + 2?"}]
    row = lambda i, labels, o="acc": {"id": f"r{i}", "prompt": p, "completions": ["2 + 2 = 4.", "4"],  # noqa: E731
                                      "objective": o, "labels": labels}
    stats = {}
    out = merge_stepwise([row(0, [0.25, 1.0]), row(1, [0.75, None]), row(2, [0.5, 0.0]), row(3, [1.0, 1.0], "eng")],
                         ["acc", "eng"], stats)
    assert len(out) == 1 and stats == {"duplicate_rows": 2}
    assert out[0]["labels"] == [[pytest.approx(0.5), 1.0], [pytest.approx(0.5), 1.0]]


def test_truncated_steps_are_counted_by_tokenize_prm(tiny_model_dir):
    import pyarrow as pa

    from pipeline.train.prm import tokenize_prm

    p = [{"role": "user", "content": "Count."}]
    rows = [{"prompt": p, "prompt_key": json.dumps(p), "completions": [f"step {i} " * 20 for i in range(6)],
             "labels": [[1.0]] * 6}]
    t = tokenize_prm(pa.Table.from_pylist(rows), tiny_model_dir, "<|step|>", 96).to_pylist()[0]
    assert t["n_steps"] == 6 and 0 < t["cut_steps"] < 6 and len(t["positions"]) == 6 - t["cut_steps"]
