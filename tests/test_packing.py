"""Padding-free SFT (PackCollate) and the labelled-only, chunked sft_loss: the packed and the padded
paths give the same loss and gradients; the new loss equals Hugging Face's `out.loss`. Pure torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.checkpoint import load_causal_lm
from pipeline.models.collate import PackCollate, PadCollate
from pipeline.models.tokenize import IGNORE
from pipeline.train import sft

PAD = 0


def _examples() -> dict[str, list[np.ndarray]]:
    """4 rows of different lengths; two labelled from their first token (no prompt), so an example's
    first label is real and only PackCollate's boundary -100 stops the previous example predicting it."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for n, prompt in ((23, 7), (9, 0), (41, 12), (16, 0)):
        x = rng.integers(3, 1000, n)
        y = x.copy()
        y[:prompt] = IGNORE
        ids.append(x)
        labels.append(y)
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    torch.manual_seed(0)
    m = load_causal_lm(tiny_model_dir, "float32", attn_implementation=request.param)
    return m.train()


def _loss_and_grads(model, batch, loss_fn=sft.sft_loss):
    model.zero_grad()
    loss = loss_fn(model, batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=atol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=atol, msg=lambda m: f"{n}: {m}")


def _hf_loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def test_pack_collate_layout():
    ex = _examples()
    b = PackCollate()(ex)
    lens = [len(x) for x in ex["input_ids"]]
    assert "attention_mask" not in b and b["num_tokens"] == (sum(lens), sum(lens))
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, sum(lens))
    starts = np.cumsum([0] + lens[:-1])
    assert (b["position_ids"][0, starts] == 0).all() and (b["labels"][0, starts] == IGNORE).all()
    assert b["position_ids"][0, starts[2] - 1] == lens[1] - 1
    p = PadCollate(PAD)(ex)
    assert p["num_tokens"] == (sum(lens), len(lens) * max(lens))


def test_packed_equals_padded(model):
    ex = _examples()
    _assert_same(_loss_and_grads(model, PackCollate()(ex)), _loss_and_grads(model, PadCollate(PAD)(ex)))


def test_sft_loss_equals_hf_loss(model, monkeypatch):
    batch = PadCollate(PAD)(_examples())
    ref = _loss_and_grads(model, batch, _hf_loss)
    _assert_same(_loss_and_grads(model, batch), ref)
    monkeypatch.setattr(sft, "CHUNK_TOKENS", 5)  # many chunks, the last one partial
    _assert_same(_loss_and_grads(model, batch), ref)


def test_packing_needs_restarted_positions_and_boundary_labels(model):
    """What makes packing exact: without either, the loss or gradients differ (so the equality test can fail)."""
    ex = _examples()
    padded = _loss_and_grads(model, PadCollate(PAD)(ex))
    packed = PackCollate()(ex)
    running = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])  # one long sequence
    leaky = dict(packed, labels=torch.from_numpy(np.concatenate(ex["labels"]))[None])  # no boundary -100
    assert sft.sft_loss(model, leaky)[1]["completion_tokens"] == sft.sft_loss(model, packed)[1]["completion_tokens"] + 2
    for wrong in (running, leaky):
        with pytest.raises(AssertionError):
            _assert_same(_loss_and_grads(model, wrong), padded)


def _prm_rows(n_obj: int) -> dict[str, list]:
    """4 PRM responses of different lengths, SEP positions inside each, labels per step and objective
    (soft in [0, 1], hard 0/1, an outcome score on the last step); two pairs of responses share a prompt."""
    rng = np.random.default_rng(1)
    rows = {"input_ids": [], "positions": [], "labels": [], "prompt_hash": []}
    for n, steps, h in ((30, (9, 19, 29), 7), (12, (11,), 7), (44, (5, 25, 43), 8), (20, (8, 19), 8)):
        rows["input_ids"].append(rng.integers(3, 1000, n))
        rows["positions"].append(np.asarray(steps))
        lab = rng.random((len(steps), n_obj)).astype(np.float32)
        lab[:, 1] = lab[:, 1] > 0.5
        rows["labels"].append(lab.reshape(-1))
        rows["prompt_hash"].append(h)
    return rows


def test_prm_packed_equals_padded(tiny_model_dir):
    """fit_prm's padding-free path: the same per-objective losses (soft, hard, Bradley-Terry outcome) and
    gradients as the padded one; without the per-response position offsets (or restarted position ids)
    it would read other tokens."""
    from pipeline.models.collate import PRMCollate
    from pipeline.models.prm import build_prm
    from pipeline.train.prm import prm_loss

    objs, kinds = ["acc", "ok", "pref"], ["soft", "hard", "outcome"]
    torch.manual_seed(0)
    prm, _ = build_prm(tiny_model_dir, objs, dict(zip(objs, kinds)), dtype=torch.float32)
    with torch.no_grad():
        prm.head.weight.normal_(0, 0.5)  # a zero head would give every position the same output
    prm.train()
    rows = _prm_rows(len(objs))
    loss = lambda m, b: prm_loss(m, b, objectives=objs, kinds=kinds, weights=[1.0, 1.0, 1.0])  # noqa: E731
    packed, padded = PRMCollate(PAD, len(objs), packed=True)(rows), PRMCollate(PAD, len(objs))(rows)
    assert packed["input_ids"].shape == (1, sum(len(x) for x in rows["input_ids"])) and "attention_mask" not in packed
    # float32 summation order differs (one row against four): a few of 131k embedding gradients differ by
    # ~4e-6 where the largest is ~34
    _assert_same(_loss_and_grads(prm, packed, loss), _loss_and_grads(prm, padded, loss), atol=2e-5)
    no_offsets = dict(packed, positions=padded["positions"])  # SEP positions of each response's own row
    assert not torch.allclose(_loss_and_grads(prm, no_offsets, loss)[0], _loss_and_grads(prm, padded, loss)[0])


def _pair_groups(n_groups: int = 2, n_obj: int = 2) -> dict[str, np.ndarray]:
    """PairCollate's input: groups of one (chosen, rejected) pair per objective, of different lengths,
    prompts unlabelled, with cached reference log-probs."""
    rng = np.random.default_rng(2)

    def seq(n, prompt):
        x = rng.integers(3, 1000, n)
        y = x.copy()
        y[:prompt] = IGNORE
        return x, y

    cols = {k: [] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "head", "objective_id",
                            "ref_chosen", "ref_rejected")}
    for g in range(n_groups):
        parts = {k: [] for k in cols}
        for o in range(n_obj):
            for side in ("chosen", "rejected"):
                x, y = seq(int(rng.integers(12, 40)), int(rng.integers(3, 10)))
                parts[f"{side}_ids"].append(x)
                parts[f"{side}_labels"].append(y)
            parts["head"].append(o)
            parts["objective_id"].append(o)
            parts["ref_chosen"].append(float(-rng.random() * 50))
            parts["ref_rejected"].append(float(-rng.random() * 50))
        for k in cols:
            cols[k].append(parts[k])
    out = {}
    for k, v in cols.items():
        out[k] = np.empty(len(v), dtype=object)
        out[k][:] = v
    return out


@pytest.mark.parametrize("soup", [False, True])
def test_mahdpo_packed_equals_padded(tiny_model_dir, soup):
    """fit_policy's padding-free forward (dpo.padding_free): the same DPO losses, metrics and gradients
    as the padded forward, for MAH-DPO and for the soup's members."""
    from pipeline.config import DPOConfig
    from pipeline.models.collate import PairCollate
    from pipeline.train.mahdpo import build_spec

    objs = ["a", "b"]
    specs = {p: build_spec(tiny_model_dir, objs, objs, DPOConfig(padding_free=p, noise_std=0.05), bf16=False, soup=soup)
             for p in (True, False)}
    torch.manual_seed(0)
    model = specs[False].build_model().float().train()
    batch = PairCollate(PAD)(_pair_groups(n_obj=len(objs)))
    res = {p: _loss_and_grads(model, batch, lambda m, b, p=p: specs[p].loss(m, b)) for p in (True, False)}
    _assert_same(res[True], res[False], atol=2e-5)
    # and it can tell: packing without restarted position ids (one causal run over all rows) differs
    from pipeline.models import logps

    def no_restart(decoder, ids, att):
        mask = att.bool()
        h = decoder(input_ids=ids[mask][None], use_cache=False).last_hidden_state[0]
        return h.new_zeros(*mask.shape, h.shape[-1]).masked_scatter(mask.unsqueeze(-1), h)

    real = logps.packed_hidden
    logps.packed_hidden = no_restart
    try:
        wrong = _loss_and_grads(model, batch, lambda m, b: specs[True].loss(m, b))
    finally:
        logps.packed_hidden = real
    assert not torch.allclose(wrong[0], res[False][0])
