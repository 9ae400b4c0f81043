"""MAH-DPO: the multi-head policy, DPO losses, balanced batches, reference log-probs, the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.multihead import IncompleteCheckpointError, MultiHeadPolicy, load_checked, validate_weights
from pipeline.models.logps import sequence_logps
from pipeline.train.dpo_losses import dpo_loss, modpo_loss, per_head_loss, rpo_nll


def test_dpo_losses_against_hand_computed_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    h = (-10 + 11) - (-12 + 11.5)  # 1.5
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rj.item() == pytest.approx(-0.05)
    ls, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert ls.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15)), abs=1e-6)
    one = torch.ones(1)  # ipo averages over completion tokens (tests/test_conventions.py): 1 token each here
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", lengths=(one, one))
    assert ipo.item() == pytest.approx((h - 5) ** 2, abs=1e-5)
    # MODPO: w_k = 0.5, the other objectives' weighted margin 0.2: -log sigma((0.1 * 1.5 - 0.2) / 0.5)
    mo, _, _ = modpo_loss(pc, pr, rc, rr, beta=0.1, scale=torch.tensor([0.5]), margin=torch.tensor([0.2]))
    assert mo.item() == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-6)
    # per-head weighting: mean within a head, weighted mean over the heads present
    total, _ = per_head_loss(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 2]), [1.0, 5.0, 3.0])
    assert total.item() == pytest.approx((1 * 2 + 3 * 10) / 4)


def test_rpo_adds_the_chosen_nll_per_token_under_each_pairs_head():
    """RPO (dpo.rpo_alpha): each pair's DPO loss + alpha x -log pi(chosen) / its token count, averaged per head
    like the DPO term; the DPO term alone is logged as dpo_loss and per objective as <o>/loss."""
    from types import SimpleNamespace

    from pipeline.train.mahdpo import mahdpo_loss

    assert rpo_nll(torch.tensor([-10.0, -3.0]), torch.tensor([4, 0])).tolist() == [2.5, 3.0]  # no tokens: /1
    logps = torch.tensor([-8.0, -6.0, -9.0, -12.0, -7.0, -10.0])  # chosen of pairs 0-2, then their rejected
    labels = torch.full((6, 5), -100)
    for row, n in enumerate([4, 2, 3, 4, 2, 3]):  # completion tokens per row (after the causal shift)
        labels[row, 5 - n:] = 1
    batch = {"head": torch.tensor([0, 1, 1]), "objective_id": torch.tensor([0, 1, 1]), "input_ids": torch.zeros(6, 5),
             "attention_mask": torch.ones(6, 5), "labels": labels, "ref_chosen": torch.tensor([-8.5, -6.5, -9.0]),
             "ref_rejected": torch.tensor([-11.0, -7.0, -9.5]), "modpo_scale": torch.full((3,), float("nan")),
             "modpo_margin": torch.full((3,), float("nan"))}
    model = lambda **kw: SimpleNamespace(logps=logps)  # noqa: E731 - the loss reads only .logps
    kw = dict(objectives=["a", "b"], head_weights=[1.0, 1.0], beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
              ref_model="-", ref_dtype="float32")
    plain, m0 = mahdpo_loss(model, batch, **kw)
    rpo, m1 = mahdpo_loss(model, batch, rpo_alpha=0.5, **kw)
    dpo, _, _ = dpo_loss(logps[:3], logps[3:], batch["ref_chosen"], batch["ref_rejected"], 0.1)
    nll = torch.tensor([8 / 4, 6 / 2, 9 / 3])
    assert plain.item() == pytest.approx((dpo[0] + dpo[1:].mean()).item() / 2)
    assert rpo.item() == pytest.approx(((dpo[0] + 0.5 * nll[0]) + (dpo[1:] + 0.5 * nll[1:]).mean()).item() / 2)
    assert m1["dpo_loss"].item() == pytest.approx(plain.item()) and m0["dpo_loss"].item() == pytest.approx(plain.item())
    assert m1["b/chosen_nll"].item() == pytest.approx(3.0) and m1["a/loss"].item() == pytest.approx(dpo[0].item())


def test_sequence_logps_sum_only_labelled_tokens():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1]])
    lp = logits.log_softmax(-1)
    assert sequence_logps(logits, labels).item() == pytest.approx((lp[0, 1, 3] + lp[0, 2, 1]).item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["full", "soup", "low_rank"])
def test_labelled_logps_equal_full_logits_values_and_gradients(tiny_model_dir, kind, monkeypatch):
    from pipeline.models import multihead
    from pipeline.train.mahdpo import SoupMembers

    monkeypatch.setattr(multihead, "CHUNK_TOKENS", 5)  # a head's tokens in several chunks

    def build():
        torch.manual_seed(0)
        if kind == "soup":
            return SoupMembers.from_sft(tiny_model_dir, ["a", "b"], noise_std=0.1)
        m = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b", "c"], noise_std=0.1, head_rank=3 if kind == "low_rank" else 0)
        if kind == "low_rank":  # U_i away from its zero start, so every factor has a gradient
            with torch.no_grad():
                m.head_up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        return m

    ids = torch.randint(5, 200, (4, 12))
    att = torch.ones_like(ids)
    att[1, 9:] = 0  # padding, never labelled
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100
    heads = torch.tensor([0, 1, 1, 0])
    full, fast = build(), build()
    a = sequence_logps(full(ids, att, head_ids=heads).logits, labels)
    b = fast(ids, att, head_ids=heads, labels=labels).logps
    assert torch.allclose(a, b, atol=1e-5)
    (a * torch.arange(1.0, 5.0)).sum().backward()
    (b * torch.arange(1.0, 5.0)).sum().backward()
    for (n, p), q in zip(full.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            # float32 sums in another order: equal to a millionth of the gradient's scale
            assert (p.grad - q.grad).abs().max() <= 1e-6 * max(1.0, p.grad.abs().max()), n


def test_causal_lm_logps_skip_the_prompt_span_and_agree(tiny_model_dir):
    from pipeline.models.checkpoint import load_causal_lm
    from pipeline.models.logps import causal_lm_logps

    model = load_causal_lm(tiny_model_dir).eval()
    ids = torch.randint(5, 200, (3, 10))
    labels = ids.clone()
    labels[0, :4], labels[1, :6], labels[2, :5] = -100, -100, -100
    labels[2, 8:] = -100
    att = torch.ones_like(ids)
    full = sequence_logps(model(input_ids=ids, attention_mask=att).logits, labels)
    assert torch.allclose(causal_lm_logps(model, ids, att, labels), full, atol=1e-5)


def test_routing_trains_own_head_and_backbone_only(tiny_model_dir):
    """One step on a pair of objective 1: head 1 and the backbone move, heads 0 and 2 do not."""
    model = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b", "c"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    lp = sequence_logps(model(ids, head_ids=torch.tensor([1, 1])).logits, labels)
    loss, _, _ = dpo_loss(lp[:1], lp[1:], torch.zeros(1), torch.zeros(1), beta=0.1)
    loss.sum().backward()
    opt.step()
    heads = model.heads.detach()
    assert not torch.equal(heads[1], before["heads"][1])
    assert torch.equal(heads[0], before["heads"][0]) and torch.equal(heads[2], before["heads"][2])
    moved = [k for k, v in model.named_parameters() if k.startswith("base.") and not torch.equal(v, before[k])]
    assert any("layers.0" in k for k in moved) and any("embed_tokens" in k for k in moved)


@pytest.mark.parametrize("head_rank", [0, 4])
def test_head_lr_trains_the_heads_at_their_own_rate(tiny_model_dir, head_rank):
    """dpo.head_lr: MAH-DPO's spec puts the heads (or a low-rank head's factors) in a group of their own; one
    Adam step then moves a head element by ~head_lr and a backbone element by ~train.lr."""
    from pipeline.config import DPOConfig, TrainConfig
    from pipeline.train.harness import param_groups
    from pipeline.train.mahdpo import build_spec

    dpo = DPOConfig(head_lr=1e-2, head_rank=head_rank)
    spec = build_spec(tiny_model_dir, ["a", "b"], ["a", "b"], dpo, bf16=False)
    model = spec.build_model()
    groups = param_groups(model, TrainConfig(lr=1e-4), spec.fresh_params, spec.named_lrs)
    head_names = {"heads"} if not head_rank else {"head_up", "head_down"}
    want = {id(p) for n, p in model.named_parameters() if n in head_names}
    assert len(groups) == 2 and groups[1]["lr"] == 1e-2 and {id(p) for p in groups[1]["params"]} == want
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 200, (2, 9))
    sequence_logps(model(ids, head_ids=torch.tensor([0, 1])).logits, ids.clone()).sum().backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    head_step = max(v for n, v in step.items() if n in head_names)
    back_step = max(v for n, v in step.items() if n not in head_names)
    assert head_step == pytest.approx(1e-2, rel=0.05) and back_step == pytest.approx(1e-4, rel=0.05)
    # unset (the paper): one rate for all
    assert len(param_groups(model, TrainConfig(lr=1e-4), (), build_spec(
        tiny_model_dir, ["a", "b"], ["a", "b"], DPOConfig(), bf16=False).named_lrs)) == 1


def test_train_layers_freezes_below_the_top_layers_with_the_same_top_gradients(tiny_model_dir):
    """dpo.train_layers = 1: the embedding and lower layers get no gradient; the top layer and the heads
    get exactly the gradients of full training (the same forward)."""
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100

    def grads(train_layers):
        torch.manual_seed(0)
        m = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b"], noise_std=0.1, train_layers=train_layers)
        lp = sequence_logps(m(ids, head_ids=torch.tensor([1, 1])).logits, labels)
        dpo_loss(lp[:1], lp[1:], torch.zeros(1), torch.zeros(1), beta=0.1)[0].sum().backward()
        return {k: p.grad for k, p in m.named_parameters()}

    full, top = grads(0), grads(1)
    n_layers = max(int(k.split("layers.")[1].split(".")[0]) for k in full if "layers." in k) + 1
    assert n_layers >= 2
    for k, g in top.items():
        lower = "embed_tokens" in k or any(f"layers.{i}." in k for i in range(n_layers - 1))
        if lower:
            assert g is None, k
        else:
            assert g is not None and torch.allclose(g, full[k], atol=1e-6), k
    with pytest.raises(ValueError, match="train_layers"):
        MultiHeadPolicy.from_sft(tiny_model_dir, ["a"], train_layers=n_layers + 1)


def test_low_rank_heads_route_save_full_heads_and_cost_r_per_head(tmp_path, tiny_model_dir):
    """head_rank r: heads = frozen SFT head + U_i D_i. They start at the SFT head, a pair of objective 1
    trains only U_1/D_1 (and the backbone), the factored projection equals the materialised head's,
    and saving writes full heads that load as an ordinary multi-head policy with the same logits."""
    from pipeline.models.checkpoint import load_tokenizer

    sft_head = load_checked(tiny_model_dir).get_output_embeddings().weight.detach()
    model = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b", "c"], head_rank=4)
    V, d = sft_head.shape
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("base.")}
    assert trainable == {"head_up": 3 * V * 4, "head_down": 3 * 4 * d} and not model.head_base.requires_grad
    assert all(torch.equal(model.head_stack()[i], sft_head) for i in range(3))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    for _ in range(2):  # D_1's gradient is zero while U_1 is: the second step moves it
        lp = model(ids, head_ids=torch.tensor([1, 1]), labels=labels).logps
        loss, _, _ = dpo_loss(lp[:1], lp[1:], torch.zeros(1), torch.zeros(1), beta=0.1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    for name in ("head_up", "head_down"):
        p = dict(model.named_parameters())[name].detach()
        assert not torch.equal(p[1], before[name][1]), name
        assert torch.equal(p[0], before[name][0]) and torch.equal(p[2], before[name][2]), name
    assert torch.equal(model.head_base, before["head_base"])
    assert any(k.startswith("base.") and not torch.equal(v, before[k]) for k, v in model.named_parameters())
    W = model.head_stack().detach()
    assert not torch.equal(W[1], sft_head) and torch.equal(W[0], sft_head)
    h = model.hidden(ids).last_hidden_state.detach()
    assert torch.allclose(model.routed_logits(h, torch.tensor([1, 2])), torch.stack([h[0] @ W[1].T, h[1] @ W[2].T]),
                          atol=1e-5)
    model.save(tmp_path / "m", tokenizer=load_tokenizer(tiny_model_dir))
    loaded = MultiHeadPolicy.load(tmp_path / "m")
    assert loaded.head_rank == 0 and torch.allclose(loaded.heads, W, atol=1e-6)
    for hid in (0, 1):
        assert torch.allclose(loaded(ids, head_ids=hid).logits, model(ids, head_ids=hid).logits, atol=1e-4)
    with pytest.raises(ValueError, match="head_rank"):
        MultiHeadPolicy(load_checked(tiny_model_dir), ["a"], heads=W[:1], head_rank=2)


def test_heads_start_from_sft_head_with_seeded_noise_and_route_per_example(tiny_model_dir):
    base = load_checked(tiny_model_dir)
    sft_head = base.get_output_embeddings().weight.detach()
    m1 = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b"], noise_std=1e-3, seed=3)
    m2 = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b"], noise_std=1e-3, seed=3)
    assert torch.equal(m1.heads, m2.heads)  # seeded
    d = (m1.heads.detach() - sft_head)
    assert 0 < float(d.abs().max()) < 6e-3 and float(d.std()) == pytest.approx(1e-3, rel=0.1)
    assert not torch.equal(m1.heads[0], m1.heads[1])
    ids = torch.randint(0, 200, (3, 5))
    routed = m1(ids, head_ids=torch.tensor([1, 0, 1])).logits
    for i, h in enumerate([1, 0, 1]):
        assert torch.allclose(routed[i], m1(ids[i:i + 1], head_ids=h).logits[0], atol=1e-5)


def test_sft_checkpoint_with_a_missing_weight_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, bad)
    f = next(bad.glob("*.safetensors"))
    sd = load_file(str(f))
    dropped = next(k for k in sd if "layers.0.mlp" in k)
    del sd[dropped]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(IncompleteCheckpointError, match="not loaded"):
        MultiHeadPolicy.from_sft(bad, ["a", "b"])


def test_mixing_equals_merged_head_and_save_load_round_trip(tmp_path, tiny_model_dir):
    from pipeline.models.checkpoint import load_tokenizer

    model = MultiHeadPolicy.from_sft(tiny_model_dir, ["acc", "eng", "conc"], noise_std=0.05)
    ids = torch.randint(0, 200, (2, 6))
    w = [0.5, 0.3, 0.2]
    mixed = model(ids, weights=torch.tensor([w, w])).logits
    assert torch.allclose(mixed, model(ids, weights=torch.tensor(w)).logits, atol=1e-4)
    manual = sum(wi * model(ids, head_ids=i).logits for i, wi in enumerate(w))
    assert torch.allclose(mixed, manual, atol=1e-4)
    tok = load_tokenizer(tiny_model_dir)
    model.export_merged({"acc": 5, "eng": 3, "conc": 2}, tmp_path / "merged", tok)  # dict, normalised
    plain = load_checked(tmp_path / "merged")
    assert torch.allclose(plain(ids).logits, mixed, atol=1e-4)
    model.save(tmp_path / "mh", tok)
    back = MultiHeadPolicy.load(tmp_path / "mh")
    assert back.objectives == ["acc", "eng", "conc"]
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="unknown objective"):
        validate_weights({"fun": 1}, ["acc"])
    for bad in ([0, 0, 0], [-1, 1, 1], [float("nan"), 1, 1]):
        with pytest.raises(ValueError):
            validate_weights(bad, ["a", "b", "c"])


def test_balanced_groups_hold_one_pair_per_objective():
    from pipeline.train.mahdpo import balanced_groups

    rows = {"a": [{"id": f"a{i}", "objective": "a"} for i in range(7)],
            "b": [{"id": f"b{i}", "objective": "b"} for i in range(3)]}
    groups = balanced_groups(rows, ["a", "b"], seed=0)
    assert len(groups) == 3 and all([r["objective"] for r in g] == ["a", "b"] for g in groups)
    assert len({g[0]["id"] for g in groups}) == 3  # distinct pairs, cut from 7 to 3
    assert groups == balanced_groups(rows, ["a", "b"], seed=0)


def test_cycle_balance_repeats_the_smaller_objectives_and_discards_nothing(tmp_path):
    from pipeline.train.mahdpo import balance_report, balanced_groups

    rows = {"a": [{"id": f"a{i}", "objective": "a"} for i in range(7)],
            "b": [{"id": f"b{i}", "objective": "b"} for i in range(3)]}
    groups = balanced_groups(rows, ["a", "b"], seed=0, balance="cycle")
    assert len(groups) == 7 and all([r["objective"] for r in g] == ["a", "b"] for g in groups)
    assert sorted(g[0]["id"] for g in groups) == sorted(r["id"] for r in rows["a"])  # every a pair once
    b = [g[1]["id"] for g in groups]
    assert set(b) == {"b0", "b1", "b2"} and sorted(b.count(x) for x in set(b)) == [2, 2, 3]  # spread evenly
    assert len(set(b[:3])) == 3 and len(set(b[3:6])) == 3  # each pass holds every pair once
    # the first pass is the truncating order (the paper's seed + dim): cycle extends it, never reorders
    assert [g[1]["id"] for g in balanced_groups(rows, ["a", "b"], seed=0)] == b[:3]
    rep = balance_report(rows, ["a", "b"], [], tmp_path, "cycle")
    assert rep["groups_per_epoch"] == 7
    assert rep["per_objective"]["b"] == {"pairs": 3, "used": 3, "discarded": 0, "repeated": 4}
    assert rep["per_objective"]["a"] == {"pairs": 7, "used": 7, "discarded": 0, "repeated": 0}
    cut = balance_report(rows, ["a", "b"], [], tmp_path, "truncate")
    assert cut["per_objective"]["a"] == {"pairs": 7, "used": 3, "discarded": 4, "repeated": 0}


def _pairs(n: int):
    out = []
    for i in range(n):
        p = [{"role": "user", "content": f"Say something about {i}."}]
        out.append({"id": f"x{i}", "prompt": p, "chosen": f"Sure, {i} is good.", "rejected": "no",
                    "objective": "acc" if i % 2 else "eng"})
    return out


def test_cached_and_on_the_fly_reference_logps_agree(tiny_model_dir):
    from pipeline.models.collate import PairCollate
    from pipeline.train.mahdpo import _tokenizer, groups_table, reference_logps, tokenize_groups
    from pipeline.models.ref_logps import RefLogps

    rows = _pairs(4)
    # prompts of ~29 tokens fit max_prompt_length (a shorter one refuses them); chosen (~11) is cut
    cached = RefLogps(tiny_model_dir, max_length=36, max_prompt_length=30, micro_batch_size=3).logps(rows)
    t = tokenize_groups(groups_table([[r] for r in rows], {"acc": 0, "eng": 1}, {"acc": 0, "eng": 1}),
                        tiny_model_dir, 36, 30)
    batch = PairCollate(_tokenizer(tiny_model_dir).pad_token_id)(
        {k: t.column(k).to_pylist() for k in t.column_names})
    assert torch.isnan(batch["ref_chosen"]).all()  # none cached in these rows
    fly = reference_logps(tiny_model_dir, "float32", batch)
    assert torch.allclose(fly[:4], torch.tensor(cached[0]), atol=1e-4)
    assert torch.allclose(fly[4:], torch.tensor(cached[1]), atol=1e-4)


def test_plan_runs_single_pools_the_same_pairs_and_soup_splits_them():
    from pipeline.train.mahdpo import plan_runs

    by_obj = {"a": [{"id": f"a{i}", "objective": "a"} for i in range(5)],
              "b": [{"id": f"b{i}", "objective": "b"} for i in range(4)]}
    (_, heads, groups, head_of, _), = plan_runs("mahdpo", ["a", "b"], by_obj, [], 0)
    assert heads == ["a", "b"] and len(groups) == 4 and head_of == {"a": 0, "b": 1}
    (_, heads_s, pooled, head_of_s, _), = plan_runs("single", ["a", "b"], by_obj, [], 0)
    assert heads_s == ["pooled"] and set(head_of_s.values()) == {0}
    assert sorted(r["id"] for g in pooled for r in g) == sorted(r["id"] for g in groups for r in g)
    assert [len(g) for g in pooled] == [2] * 4  # as many pairs per step as MAH-DPO: equal optimizer steps
    (_, heads_p, groups_p, head_of_p, _), = plan_runs("soup", ["a", "b"], by_obj, [], 0, soup_together=True)
    assert heads_p == ["a", "b"] and head_of_p == {"a": 0, "b": 1} and groups_p == groups  # member i gets pair i
    held = [{"id": "ha", "objective": "a"}, {"id": "hb", "objective": "b"}]
    apart = plan_runs("soup", ["a", "b"], by_obj, held, 0)  # default: one run per member, one after another
    assert [(n, h, ho) for n, h, _, ho, _ in apart] == [("a", ["a"], {"a": 0}), ("b", ["b"], {"b": 0})]
    assert [[r["id"] for g in gs for r in g] for _, _, gs, _, _ in apart] == [[g[0]["id"] for g in groups],
                                                                              [g[1]["id"] for g in groups]]
    assert [[r["id"] for r in ev] for *_, ev in apart] == [["ha"], ["hb"]]
    # modpo: one head on the pooled pairs of the weighted objectives only (its loss divides by w_k)
    (_, heads_m, groups_m, head_of_m, held_m), = plan_runs("modpo", ["a", "b"], by_obj, held, 0,
                                                           modpo_weights={"a": 1.0, "b": 0.0})
    assert heads_m == ["modpo"] and head_of_m == {"a": 0, "b": 0} and [r["id"] for r in held_m] == ["ha"]
    assert sorted(r["id"] for g in groups_m for r in g) == sorted(r["id"] for r in by_obj["a"])


def test_modpo_margins_come_from_the_other_objectives_scores():
    from pipeline.train.mahdpo import modpo_terms

    rows = [{"id": "p1", "objective": "acc", "scores": [{"objective": "acc", "chosen": 0.9, "rejected": 0.1},
                                                         {"objective": "eng", "chosen": 0.2, "rejected": 0.6}]},
            {"id": "p2", "objective": "conc", "scores": [{"objective": "conc", "chosen": 1.0, "rejected": 0.0}]}]
    modpo_terms(rows, {"acc": 0.5, "eng": 0.3, "conc": 0.2})
    assert rows[0]["modpo_scale"] == 0.5 and rows[0]["modpo_margin"] == pytest.approx(0.3 * (0.2 - 0.6))
    assert rows[1]["modpo_scale"] == 0.2 and rows[1]["modpo_margin"] == 0.0  # not scored on acc / eng: no margin
    with pytest.raises(ValueError, match="'p3'.*no 'scores'.*build_pairs"):
        modpo_terms([{"id": "p3", "objective": "acc", "scores": None}], {"acc": 1.0})


def test_pair_agreement_checks_the_prms_pairs_against_the_judges():
    import json

    from pipeline.rollout.pairs import pair_agreement
    from pipeline.tasks import splits
    from pipeline.tasks.assistant import TOPICS

    problems, _ = splits("assistant", 4, 2, 0)["train"]
    p = problems[0]
    aspects = TOPICS[json.loads(p["meta"])["topic"]]
    full = " ".join(s for _, s in aspects)
    th, co = "assistant/thoroughness", "assistant/concision"  # objective ids (docs/tasks.md)
    pairs = [{"id": f"{p['id']}-{th}", "objective": th, "chosen": full, "rejected": "I hope this helps!"},
             {"id": f"{p['id']}-{co}", "objective": co, "chosen": "I hope this helps!", "rejected": aspects[0][1]},
             {"id": f"{p['id']}-{co}", "objective": co, "chosen": "Hi.", "rejected": "Hello."}]
    assert pair_agreement(pairs, {q["id"]: q for q in problems}) == {
        "assistant/concision": {"disagree": 1, "tie": 1}, "assistant/thoroughness": {"agree": 1}}


def test_prm_pairs_vs_judge_counts_what_the_prm_would_have_paired():
    """For an objective paired by its judge, the PRM's own best-vs-worst picks from the same candidates
    are checked against that judge; objectives the PRM or the judge does not score are left out."""
    from pipeline.rollout.pairs import prm_pairs_vs_judge

    cands = [{"problem_id": pid, "task": "t", "prompt": "[]", "response": f"{pid}{k}", "candidate": k}
             for pid in ("p1", "p2", "p3") for k in range(3)]
    prm = {"a": [0.9, 0.1, 0.5,  0.2, 0.8, 0.5,  0.5, 0.5, 0.52], "b": [0.0] * 9}
    judge = {"a": [1.0, 0.0, 0.0,  1.0, 0.0, 0.0,  0.3, 0.3, 0.3]}
    got = prm_pairs_vs_judge(cands, prm, judge, {"t": ["a", "b"]}, min_margin=0.05)
    # p1: PRM picks 0 over 1, the judge agrees; p2: PRM picks 1 over 0, the judge disagrees; p3: margin too small
    assert got == {"a": {"agree": 1, "disagree": 1}}
    judge["a"][0] = float("nan")
    assert prm_pairs_vs_judge(cands, prm, judge, {"t": ["a", "b"]}, 0.05) == {"a": {"unscored": 1, "disagree": 1}}


def test_soup_members_train_independently_and_export_each(tmp_path, tiny_model_dir):
    """A pair of objective 0 moves member 0 only; each member exports as its own policy."""
    from pipeline.train.mahdpo import SoupMembers, export_soup

    soup = SoupMembers.from_sft(tiny_model_dir, ["a", "b"])
    before = [p.detach().clone() for p in soup.members[1].parameters()]
    ids = torch.randint(0, 200, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    out = soup(ids, torch.ones_like(ids), head_ids=torch.tensor([0, 0]))
    single = soup.members[0](ids, torch.ones_like(ids), head_ids=0).logits
    assert torch.allclose(out.logits, single, atol=1e-5)
    lp = sequence_logps(out.logits, labels)
    dpo_loss(lp[:1], lp[1:], torch.zeros(1), torch.zeros(1), beta=0.1)[0].sum().backward()
    assert all(p.grad is None for p in soup.members[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in soup.members[0].parameters())
    export_soup(soup, soup.state_dict(), str(tmp_path / "model"), tiny_model_dir)
    a = MultiHeadPolicy.load(tmp_path / "a" / "model")
    assert a.objectives == ["a"] and torch.equal(a.heads, soup.members[0].heads.detach())
    assert all(torch.equal(x, y) for x, y in zip(before, MultiHeadPolicy.load(tmp_path / "b" / "model").parameters()))
    # the held-out-best export (model_best) goes beside each member's final model, not over it
    with torch.no_grad():
        soup.members[0].heads.add_(1.0)
    export_soup(soup, soup.state_dict(), str(tmp_path / "model_best"), tiny_model_dir)
    assert torch.equal(MultiHeadPolicy.load(tmp_path / "a" / "model_best").heads, soup.members[0].heads)
    assert torch.equal(MultiHeadPolicy.load(tmp_path / "a" / "model").heads, a.heads)


@pytest.mark.slow
def test_build_pairs_then_fit_policy_jobs(tmp_path, ray_session, tiny_model_dir):
    """jobs.build_pairs (a fake policy with candidates of growing length; a PRM scores
    thoroughness, the task's judge scores concision; reference log-probs cached) then
    jobs.fit_policy (MAH-DPO, 2 workers, ZeRO-2) on its shards; the exported policy loads."""
    import json

    import pyarrow.parquet as pq

    from jobs.build_pairs import main as build_pairs
    from jobs.fit_policy import main as fit_policy
    from pipeline.data import write_records
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.prm import build_prm
    from pipeline.tasks import assistant
    from pipeline.train.harness import read_metrics

    problems, _ = assistant.generate(24, 0, "train")
    write_records(problems, tmp_path / "problems.parquet", "problem")
    prm, tok = build_prm(tiny_model_dir, ["thoroughness"], {"thoroughness": "soft"})
    prm.save(tmp_path / "prm", tokenizer=tok)
    summary = build_pairs([
        "--model.name_or_path", tiny_model_dir, "--problems", f"[{tmp_path / 'problems.parquet'}]",
        "--prm", str(tmp_path / "prm"), "--score_with_objective", "[concision]", "--min_margin", "0.0",
        "--shared_objectives", "[thoroughness, concision]",  # bare ids, as the tiny PRM names its output
        "--n_candidates", "3", "--engine.kind", "callable", "--engine.target", "fakes:VariedPolicy",
        "--engine.env", "{}", "--engine.engine_args", "{}", "--dpo.max_length", "256", "--dpo.max_prompt_length", "64",
        "--out_dir", str(tmp_path / "pairs")])
    assert summary["per_objective"]["concision"] == 24 and summary["per_objective"]["thoroughness"] >= 20
    rows = pq.read_table(tmp_path / "pairs" / "pairs-00000.parquet").to_pylist()
    conc = [r for r in rows if r["objective"] == "concision"]
    assert all(len(r["chosen"]) < len(r["rejected"]) for r in conc)  # the judge prefers the short one
    assert all(r["ref_chosen_logp"] < 0 and r["ref_rejected_logp"] < 0 for r in rows)
    assert json.loads((tmp_path / "pairs" / "_ref_logps.json").read_text())["max_length"] == 256
    # every pair carries both responses' scores on every objective of its task (MODPO's margins)
    for r in rows:
        sc = {s["objective"]: s for s in r["scores"]}
        assert set(sc) == {"concision", "thoroughness"}
        assert sc[r["objective"]]["chosen"] == pytest.approx(r["chosen_score"])
        assert sc[r["objective"]]["rejected"] == pytest.approx(r["rejected_score"])

    common = ["--model.name_or_path", tiny_model_dir, "--data.paths", f"[{tmp_path / 'pairs'}]",
              "--dpo.max_length", "256", "--dpo.max_prompt_length", "64", "--train.storage_path", str(tmp_path / "ray"),
              "--train.tracker.kind", "none", "--train.lr", "1e-3", "--train.bf16", "false"]
    res = fit_policy(common + ["--output_dir", str(tmp_path / "policy"), "--data.eval_fraction", "0.2",
                               "--train.num_workers", "2", "--train.micro_batch_size", "2", "--train.max_steps", "6",
                               "--train.epochs", "5", "--train.checkpoint_every", "6", "--dpo.rpo_alpha", "1.0",
                               "--train.eval_every", "2", "--train.best_metric", "eval/dpo_loss",
                               "--dpo.head_lr", "2e-3"])["mahdpo"]
    logged = read_metrics(str(tmp_path / "policy" / "logs"))
    assert logged[-1]["lr"] == pytest.approx(1e-3) and logged[-1]["lr_group1"] == pytest.approx(2e-3)  # the heads' rate
    assert {"concision/loss", "thoroughness/reward_accuracy", "concision/margin", "concision/chosen_nll",
            "dpo_loss"} <= set(logged[-1])
    assert "eval/concision/reward_accuracy" in res.metrics
    # held out every 2 steps (6: the end's, with the checkpoint), each logged once; the best kept with its step
    from pipeline.train.harness import BEST, EVAL_METRICS

    held = read_metrics(str(tmp_path / "policy" / "logs"), EVAL_METRICS)
    assert [e["step"] for e in held] == [2, 4, 6] and all("eval/dpo_loss" in e for e in held)
    best = json.loads((tmp_path / "policy" / "logs" / BEST).read_text())
    assert best["value"] == min(e["eval/dpo_loss"] for e in held) and best["metric"] == "eval/dpo_loss"
    assert best["step"] == min(held, key=lambda e: e["eval/dpo_loss"])["step"]
    assert res.best_dir == str(tmp_path / "policy" / "model") + "_best"
    MultiHeadPolicy.load(res.best_dir)
    policy = MultiHeadPolicy.load(tmp_path / "policy" / "model")
    assert policy.objectives == ["concision", "thoroughness"]
    assert not torch.equal(policy.heads[0], policy.heads[1])
    # The trained heads prefer their own objective's chosen responses (implicit DPO reward margin).
    from pipeline.models.collate import PairCollate
    from pipeline.train.mahdpo import _tokenizer, groups_table, tokenize_groups

    head_of = {"concision": 0, "thoroughness": 1}
    t = tokenize_groups(groups_table([[r] for r in rows], head_of, head_of), tiny_model_dir, 256, 64)
    b = PairCollate(_tokenizer(tiny_model_dir).pad_token_id)({k: t.column(k).to_pylist() for k in t.column_names})

    def margins(p):
        with torch.no_grad():
            lp = sequence_logps(p(b["input_ids"], b["attention_mask"], head_ids=torch.cat([b["head"], b["head"]])).logits,
                                b["labels"])
        n = len(rows)
        return (lp[:n] - b["ref_chosen"]) - (lp[n:] - b["ref_rejected"])

    margin = margins(policy)
    assert (margin > 0).float().mean() > 0.7, margin
    from pipeline.config import DPOConfig
    from pipeline.train.mahdpo import check_ref_meta

    with pytest.raises(ValueError, match="cached reference log-probs"):
        check_ref_meta([str(tmp_path / "pairs")], tiny_model_dir, DPOConfig(max_length=128, max_prompt_length=64))
    load_tokenizer(tmp_path / "policy" / "model")
    # MODPO baseline from the same shards: one head for the weight vector, the margins from the scores
    # (on ZeRO-3, as the GPU configs: partitioned heads through the routed projection's own backward)
    modpo = common + ["--output_dir", str(tmp_path / "modpo"), "--method", "modpo",
                      "--modpo_weights", "{concision: 0.7, thoroughness: 0.3}", "--train.num_workers", "2",
                      "--train.zero_stage", "3", "--train.micro_batch_size", "2", "--train.max_steps", "2"]
    with pytest.raises(Exception, match="a checkpoint of another run under run_name 'policy'.*'method'"):
        fit_policy(modpo)  # the MAH-DPO run's name: its checkpoint is not resumed into another model
    fit_policy(modpo + ["--run_name", "modpo"])
    modpo_logged = read_metrics(str(tmp_path / "modpo" / "logs"))
    assert {"concision/loss", "thoroughness/loss"} <= set(modpo_logged[-1])
    modpo_policy = MultiHeadPolicy.load(tmp_path / "modpo" / "model")
    assert modpo_policy.objectives == ["modpo"]
    start = MultiHeadPolicy.from_sft(tiny_model_dir, ["modpo"]).heads.detach()  # the seeded initial head
    assert float((modpo_policy.heads.detach() - start).abs().max()) > 1e-4  # the head trained
    # Low-rank heads through Ray Train + DeepSpeed: refused as the full-head run's checkpoint; exports full heads
    low = common + ["--output_dir", str(tmp_path / "low"), "--dpo.head_rank", "4", "--train.num_workers", "2",
                    "--train.micro_batch_size", "2", "--train.max_steps", "6", "--train.epochs", "5"]
    with pytest.raises(Exception, match="a checkpoint of another run under run_name 'policy'.*'head_rank'"):
        fit_policy(low)
    fit_policy(low + ["--run_name", "low"])
    low_policy = MultiHeadPolicy.load(tmp_path / "low" / "model")
    assert low_policy.head_rank == 0 and low_policy.heads.shape == policy.heads.shape
    assert not torch.equal(low_policy.heads[0], low_policy.heads[1])
    low_margin = margins(low_policy)  # low-rank heads, the same settings as the MAH-DPO run above: it learns too
    assert (low_margin > 0).float().mean() > 0.7, low_margin
