"""Supervised fine-tuning on prompt/completion records, through the shared harness.

Loss: next-token cross-entropy on completion tokens only (prompt tokens are -100),
averaged over the completion tokens of the micro-batch.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import SFTJobConfig
from pipeline.data.stream import quarantine_count, read_dataset
from pipeline.models.checkpoint import load_causal_lm, load_tokenizer, save_pretrained
from pipeline.models.registry import resolve_model
from pipeline.models.tokenize import IGNORE, encode_prompt_completion
from pipeline.models.collate import PackCollate, PadCollate
from pipeline.models.precision import dtype_name
from pipeline.train.harness import FitResult, TrainSpec, fit

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    return load_tokenizer(model_dir)


def tokenize_sft(batch: pa.Table, model_dir: str, max_length: int, max_prompt_length: int) -> pa.Table:
    tok = _tokenizer(model_dir)
    enc = [encode_prompt_completion(tok, p, c, max_length, max_prompt_length)
           for p, c in zip(batch.column("prompt").to_pylist(), batch.column("completion").to_pylist())]
    return pa.table({
        "input_ids": pa.array([e["input_ids"] for e in enc], pa.list_(pa.int32())),
        "labels": pa.array([e["labels"] for e in enc], pa.list_(pa.int32())),
        "truncated": pa.array([int(e["truncated"]) for e in enc], pa.int8()),
        "refused": pa.array([int(e["refused"]) for e in enc], pa.int8()),
    })


def _drop_refused(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("refused"), 0)).drop_columns(["refused"])


def tokenize_and_count(datasets: dict, tok_fn, out_dir: Path, max_prompt_length: int) -> tuple[dict, int]:
    """Tokenised datasets without refused rows (prompt over max_prompt_length even with its earliest
    turns dropped), the number of training rows left; counts in out_dir/tokenization.json and the log."""
    report, out = {}, {}
    for k, v in datasets.items():
        t = v.map_batches(tok_fn, batch_format="pyarrow", batch_size=64).materialize()
        n = t.count()
        report[k] = {"rows": n, **{c: int(t.sum(c) or 0) if n else 0 for c in ("refused", "truncated")}}
        if report[k]["refused"]:
            log.warning("SFT %s: %d of %d rows refused: the prompt's last user turn alone exceeds "
                        "sft.max_prompt_length %d", k, report[k]["refused"], n, max_prompt_length)
        out[k] = t.map_batches(_drop_refused, batch_format="pyarrow")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenization.json").write_text(json.dumps(report, indent=1))
    return out, report["train"]["rows"] - report["train"]["refused"]


CHUNK_TOKENS = 1024  # labelled tokens whose float32 log-softmax is computed at once


class _ChunkedCE(torch.autograd.Function):
    """Summed cross-entropy of logits [N, vocab] (the model's dtype) against targets [N] (IGNORE
    rows count nothing), in float32, CHUNK_TOKENS rows at a time. Saves the logits only and
    recomputes each chunk's softmax in backward, so no [N, vocab] float32 tensor exists
    (F.cross_entropy on upcast logits keeps the float32 copy's log-softmax for backward)."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for z, y in zip(logits.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS)):
            z, m = z.float(), y != IGNORE
            nll = z.logsumexp(-1) - z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += nll.where(m, 0.0).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        for z, y, g in zip(logits.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS), out.split(CHUNK_TOKENS)):
            p, m = z.float().softmax(-1), y != IGNORE
            p[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
            g.copy_(p.mul_((m * grad)[:, None]))
        return out, None


def sft_loss(model, batch):
    """Mean next-token cross-entropy over the micro-batch's labelled tokens (what HF's `out.loss`
    is). Only the positions that predict a labelled token are projected on the vocabulary
    (`logits_to_keep` = their indices): prompt and padding cost no [vocab] row. Padded batches
    [B, T] keep the union over rows (a row's unlabelled kept positions count nothing); packed
    batches [1, T] (PackCollate) keep exactly the labelled ones. Through the model's own forward,
    so a DeepSpeed engine (ZeRO-3 included) gathers the LM head as usual."""
    tgt = batch["labels"][:, 1:]
    keep = (tgt != IGNORE).any(0).nonzero().squeeze(1)  # positions t whose logits predict token t + 1
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    # use_cache=False: with a KV cache (the config's default) transformers ignores packed position ids
    # and masks causally across the packed examples (masking_utils._preprocess_mask_arguments)
    logits = model(input_ids=batch["input_ids"], logits_to_keep=keep, use_cache=False, **kw).logits  # [B, K, vocab]
    y = tgt[:, keep].reshape(-1)
    n_tokens = (y != IGNORE).sum()
    # clamp: a micro-batch without a labelled token gives loss 0 and zero gradients, not 0/0 = NaN in every weight
    loss = _ChunkedCE.apply(logits.reshape(-1, logits.shape[-1]), y) / n_tokens.clamp(min=1)
    return loss, {"completion_tokens": n_tokens}


def export_hf(module, state_dict: dict, out_dir: str, tokenizer_dir: str) -> None:
    save_pretrained(module, load_tokenizer(tokenizer_dir), out_dir, state_dict=state_dict)


def _split_part(batch: pa.Table, fraction: float, held: bool) -> pa.Table:
    from pipeline.data.split import held_out

    return batch.filter(pa.array([held_out(p, fraction) == held for p in batch.column("prompt").to_pylist()], pa.bool_()))


def split_by_dialogue(records, fraction: float) -> dict:
    """{"train", "eval"} by prompt (pipeline.data.split): the turns of one dialogue all land on one side.
    No held-out row at all (a small set) is said, and the fit runs without evaluation."""
    part = lambda held: records.map_batches(_split_part, fn_kwargs={"fraction": fraction, "held": held},  # noqa: E731
                                            batch_format="pyarrow").materialize()
    train, held = part(False), part(True)
    n_held = held.count()
    log.info("SFT: held-out split by dialogue: %d rows held out, %d to train on", n_held, train.count())
    if not n_held:
        log.warning("SFT: data.eval_fraction %g holds out no dialogue of this data: no held-out loss", fraction)
        return {"train": train}
    return {"train": train, "eval": held}


def build_spec(model_dir: str, bf16: bool, params: dict | None = None, padding_free: bool = False) -> TrainSpec:
    """padding_free: each micro-batch packed into one row (PackCollate), else right-padded."""
    return TrainSpec(
        build_model=functools.partial(load_causal_lm, model_dir, dtype_name(bf16)),
        collate=PackCollate() if padding_free else PadCollate(_tokenizer(model_dir).pad_token_id),
        loss=sft_loss,
        export=functools.partial(export_hf, tokenizer_dir=model_dir),
        params=params or {},
    )


def run_sft(cfg: SFTJobConfig) -> FitResult:
    """Fine-tune `cfg.model` on the SFT records in `cfg.data.paths`; export to output_dir/model."""
    if not cfg.data.paths:
        raise ValueError("data.paths is empty: give the SFT records to train on")
    model_dir = resolve_model(cfg.model.name_or_path)
    out = Path(cfg.output_dir)
    qdir = cfg.data.quarantine_dir or str(out / "quarantine")
    records = read_dataset(cfg.data.paths, "sft", defaults=cfg.data.defaults, skip_bad_rows=cfg.data.skip_bad_rows,
                           quarantine_dir=qdir, split=cfg.data.split).materialize()
    # shuffled once here (the harness shuffles only within a small buffer): the files may be ordered by family
    datasets = {"train": records.random_shuffle(seed=cfg.train.seed).materialize()}
    if cfg.data.eval_fraction > 0:
        datasets = split_by_dialogue(datasets["train"], cfg.data.eval_fraction)
    n_bad = quarantine_count(qdir)
    if n_bad:
        log.warning("%d bad SFT rows quarantined in %s", n_bad, qdir)
    tok_fn = functools.partial(tokenize_sft, model_dir=model_dir, max_length=cfg.sft.max_length,
                               max_prompt_length=cfg.sft.max_prompt_length)
    datasets, n_train = tokenize_and_count(datasets, tok_fn, out, cfg.sft.max_prompt_length)
    if not n_train:
        raise ValueError(f"no SFT rows left to train on: all were refused (see {out / 'tokenization.json'})")
    spec = build_spec(model_dir, cfg.train.bf16, params={"model": model_dir, **cfg.train.model_dump(exclude={"deepspeed", "tracker"})},
                      padding_free=cfg.sft.padding_free)
    return fit(spec, cfg.train, datasets, run_name=cfg.run_name, num_train_rows=n_train,
               log_dir=str(out / "logs"), export_dir=str(out / "model"))
