"""Where we stand against TRL (docs/policy.md "Conventions vs TRL"): IPO's length-averaged
log-ratios, string vs message prompts, prompt truncation at message boundaries (refused rows
counted), and one prompt tokenisation for training and generation (no double BOS)."""

import json
import math

import pyarrow as pa
import pytest
import torch

from pipeline.models import load_tokenizer
from pipeline.models.tokenize import IGNORE, encode_pair, encode_prompt_completion, ids_of, prompt_ids
from pipeline.train.dpo_losses import completion_lengths, dpo_loss

Q = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """A Llama-3-like tokenizer: its post-processor adds a BOS, its chat template writes one."""
    from pipeline.models.tiny import build_tiny_model

    return load_tokenizer(build_tiny_model(tmp_path_factory.mktemp("bos") / "model", bos=True))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


# --- one prompt tokenisation -------------------------------------------------------------------

def test_prompt_ids_hold_one_bos_where_text_tokenisation_gives_two(bos_tok):
    bos = bos_tok.bos_token_id
    ids = prompt_ids(bos_tok, Q)
    assert ids[0] == bos and ids.count(bos) == 1
    text = bos_tok.apply_chat_template(Q, tokenize=False, add_generation_prompt=True)
    assert bos_tok(text)["input_ids"][:2] == [bos, bos]  # what vLLM did with the rendered text
    enc = encode_prompt_completion(bos_tok, Q, "5", 128, 64)
    assert enc["input_ids"][: len(ids)] == ids and enc["labels"][: len(ids)] == [IGNORE] * len(ids)


def test_transformers_engine_generates_from_the_training_ids(tmp_path_factory, bos_tok):
    from pipeline.engines.hf_engine import TransformersEngine
    from pipeline.models.tiny import build_tiny_model

    engine = TransformersEngine(str(build_tiny_model(tmp_path_factory.mktemp("bos_hf") / "m", bos=True)),
                                dtype="float32", device="cpu")
    seen = []
    real = engine.model.generate
    engine.model.generate = lambda **kw: seen.append(kw["input_ids"].tolist()) or real(**kw)
    engine.generate([Q, Q + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "and 3 + 4?"}]],
                    max_tokens=2, temperature=0)
    longer = prompt_ids(bos_tok, Q + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "and 3 + 4?"}])
    pad = [bos_tok.pad_token_id] * (len(longer) - len(prompt_ids(bos_tok, Q)))
    assert seen == [[pad + prompt_ids(bos_tok, Q), longer]]  # left-padded training ids, one BOS each


# --- string (standard) and message (conversational) prompts ------------------------------------

def test_string_prompt_is_raw_text_and_messages_use_the_template(tok):
    raw = encode_prompt_completion(tok, "Question: 2 + 3 =", " 5", 128, 64)
    assert raw["input_ids"] == ids_of(tok, "Question: 2 + 3 =") + ids_of(tok, " 5" + tok.eos_token)  # TRL: + EOS
    assert raw["labels"].count(IGNORE) == len(ids_of(tok, "Question: 2 + 3 ="))
    assert "<|im_start|>" not in tok.decode(raw["input_ids"])
    chat = encode_prompt_completion(tok, [{"role": "user", "content": "Question: 2 + 3 ="}], " 5", 128, 64)
    assert tok.decode(chat["input_ids"]).startswith("<|im_start|>user\nQuestion: 2 + 3 =<|im_end|>")
    # the record reader turns a file's string prompt into one user turn (the chat path above)
    from pipeline.data.records import normalise

    row = normalise("preference", {"prompt": "Question: 2 + 3 =", "chosen": " 5", "rejected": " 6"})
    assert row["prompt"] == [{"role": "user", "content": "Question: 2 + 3 ="}]


# --- truncation at message boundaries ------------------------------------------------------------

def _three_turns(last: str = "Last question: what is nine plus one?") -> list[dict]:
    long = " ".join(["apples and books"] * 12)
    return [{"role": "system", "content": "You are a tutor."},
            {"role": "user", "content": "First: " + long}, {"role": "assistant", "content": "One: " + long},
            {"role": "user", "content": "Second: " + long}, {"role": "assistant", "content": "Two: " + long},
            {"role": "user", "content": last}]


def test_long_prompt_drops_earliest_turns_keeping_system_and_last_turn(tok):
    p = _three_turns()
    sys_last = [p[0], p[-1]]
    budget = len(prompt_ids(tok, sys_last)) + 2  # room for the system message and the last turn only
    assert len(prompt_ids(tok, p)) > budget
    e = encode_pair(tok, p, "ten " * 40, "eleven", max_length=budget + 30, max_prompt_length=budget)
    assert e["truncated"] and not e["refused"]
    n = e["chosen_labels"].count(IGNORE)
    assert e["chosen_ids"][:n] == prompt_ids(tok, sys_last) == e["rejected_ids"][:n]  # whole turns, role headers
    text = tok.decode(e["chosen_ids"][:n])
    assert text.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{p[-1]['content']}<|im_end|>" in text
    assert "First" not in text and "Second" not in text
    assert len(e["chosen_ids"]) == budget + 30  # the long response is cut to what is left
    # more room: the second exchange is kept too, starting at its user turn
    mid = [p[0]] + p[3:]
    e2 = encode_pair(tok, p, "ten " * 40, "eleven", max_length=len(prompt_ids(tok, mid)) + 30,
                     max_prompt_length=len(prompt_ids(tok, mid)))
    assert e2["chosen_ids"][: e2["chosen_labels"].count(IGNORE)] == prompt_ids(tok, mid)


def test_prompt_whose_last_turn_alone_is_too_long_is_refused_and_counted(tok, tiny_model_dir, tmp_path):
    from pipeline.config import DPOConfig
    from pipeline.models.ref_logps import RefLogps
    from pipeline.train.mahdpo import refuse_long_pairs

    p = _three_turns(last="Last: " + " ".join(["students and coins"] * 30))
    assert encode_pair(tok, p, "a", "b", 64, 40)["refused"]
    assert encode_prompt_completion(tok, "raw " * 60, "a", 64, 40)["refused"]  # raw text is never cut either
    rows = [{"id": "ok", "prompt": Q, "chosen": "5", "rejected": "6"},
            {"id": "long", "prompt": p, "chosen": "5", "rejected": "6"}]
    dpo = DPOConfig(max_length=64, max_prompt_length=40)
    kept = refuse_long_pairs(rows, tiny_model_dir, dpo, tmp_path)
    assert [r["id"] for r in kept] == ["ok"]
    assert json.loads((tmp_path / "tokenization.json").read_text()) == {
        "pairs": 2, "refused": 1, "truncated": 0, "refused_ids": ["long"]}
    c, r = RefLogps(tiny_model_dir, 64, 40).logps(rows)  # same function: the cache leaves it null
    assert c[1] is None and r[1] is None and math.isfinite(c[0]) and math.isfinite(r[0])


def test_sft_tokenisation_marks_and_drops_refused_rows(tiny_model_dir):
    from pipeline.train.sft import _drop_refused, tokenize_sft

    long = _three_turns(last="Last: " + " ".join(["students and coins"] * 30))
    batch = pa.Table.from_pylist([{"prompt": Q, "completion": "5"}, {"prompt": long, "completion": "5"}])
    t = tokenize_sft(batch, tiny_model_dir, 64, 40)
    assert t.column("refused").to_pylist() == [0, 1]
    kept = _drop_refused(t)
    assert kept.num_rows == 1 and "refused" not in kept.column_names and kept.column("input_ids")[0].as_py()


# --- IPO --------------------------------------------------------------------------------------------

def test_ipo_uses_length_averaged_log_ratios_like_trl():
    pc, pr = torch.tensor([-12.0, -30.0]), torch.tensor([-20.0, -18.0])
    rc, rr = torch.tensor([-14.0, -29.0]), torch.tensor([-19.0, -21.0])
    nc, nr = torch.tensor([4, 10]), torch.tensor([8, 6])
    beta = 0.1
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, "ipo", lengths=(nc, nr))
    # TRL: logps / completion length for policy and reference, then (logits - 1 / (2 beta))^2
    trl = ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * beta)) ** 2
    assert torch.allclose(loss, trl)
    assert torch.allclose(chosen_r, beta * (pc - rc) / nc)
    summed = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2  # the old convention: a different loss
    assert not torch.allclose(loss, summed)
    with pytest.raises(ValueError, match="pass lengths"):
        dpo_loss(pc, pr, rc, rr, beta, "ipo")
    # sigmoid keeps summed log-probs, lengths or not
    assert torch.equal(dpo_loss(pc, pr, rc, rr, beta)[0], dpo_loss(pc, pr, rc, rr, beta, lengths=(nc, nr))[0])


def test_mahdpo_loss_passes_completion_lengths_to_ipo():
    from pipeline.models.multihead import SequenceLogps
    from pipeline.train.mahdpo import mahdpo_loss

    labels = torch.full((2, 8), IGNORE)
    labels[0, 5:] = 1  # chosen: 3 completion tokens
    labels[1, 2:] = 1  # rejected: 6
    assert completion_lengths(labels).tolist() == [3, 6]
    pol = torch.tensor([-6.0, -9.0])

    class Fixed(torch.nn.Module):
        def forward(self, **kw):
            return SequenceLogps(pol)

    batch = {"head": torch.tensor([0]), "objective_id": torch.tensor([0]), "input_ids": torch.zeros(2, 8, dtype=torch.long),
             "attention_mask": torch.ones(2, 8, dtype=torch.long), "labels": labels,
             "ref_chosen": torch.tensor([-3.0]), "ref_rejected": torch.tensor([-12.0]),
             "modpo_scale": torch.tensor([float("nan")]), "modpo_margin": torch.tensor([float("nan")])}
    total, _ = mahdpo_loss(Fixed(), batch, objectives=["a"], head_weights=[1.0], beta=0.5, loss_type="ipo",
                           label_smoothing=0.0, ref_model="unused", ref_dtype="float32")
    want = ((-6 / 3 - -9 / 6) - (-3 / 3 - -12 / 6) - 1.0) ** 2
    assert total.item() == pytest.approx(want)


def test_cached_reference_logps_from_another_tokenisation_are_refused(tmp_path, tiny_model_dir):
    from pipeline.config import DPOConfig
    from pipeline.models.ref_logps import write_meta
    from pipeline.train.mahdpo import check_ref_meta

    dpo = DPOConfig()
    write_meta(tmp_path, tiny_model_dir, dpo.max_length, dpo.max_prompt_length, dpo.ref_dtype)
    check_ref_meta([str(tmp_path)], tiny_model_dir, dpo)  # this tokenisation: accepted
    meta = json.loads((tmp_path / "_ref_logps.json").read_text())
    del meta["tokenization"]  # a cache written before turn-boundary truncation
    (tmp_path / "_ref_logps.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenization"):
        check_ref_meta([str(tmp_path)], tiny_model_dir, dpo)
