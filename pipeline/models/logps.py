"""Sequence log-probabilities of completions (DPO's policy and reference terms).

Shared by training (pipeline.train.mahdpo), the cached reference log-probs
(pipeline.models.ref_logps) and anything else that scores completions.
"""

from __future__ import annotations

import torch

from pipeline.models.tokenize import IGNORE


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over labelled (non -100) tokens, one value per row; logits [B, T, V]."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    tgt = labels.clamp(min=0)
    # log_softmax in float32: bf16 log-probs summed over hundreds of tokens lose the margin.
    lp = torch.gather(logits.float().log_softmax(-1), 2, tgt.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def causal_lm_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sequence_logps of a Hugging Face causal LM, with logits only from the batch's first labelled
    position on (`logits_to_keep`): the prompt span every row shares never reaches the vocabulary."""
    labelled = labels != IGNORE
    first = int(labelled.float().argmax(1).min()) if bool(labelled.any(1).all()) else 0
    keep = labels.shape[1] - max(first - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return sequence_logps(logits, labels[:, -keep:])


def packed_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] for right-padded rows, computed on the rows packed into one
    [1, sum(lengths)] row: position ids restart per row and transformers masks block-diagonally (sdpa,
    eager; varlen kernels on GPU), so no compute goes to padding. Padding positions come back as zeros;
    everything downstream (labelled positions, per-row sums) reads the padded layout unchanged."""
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    pos = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])[None]
    # use_cache=False: with a cache transformers ignores packed position ids (one causal mask over all rows)
    h = decoder(input_ids=input_ids[mask][None], position_ids=pos, use_cache=False).last_hidden_state[0]
    return h.new_zeros(*mask.shape, h.shape[-1]).masked_scatter(mask.unsqueeze(-1), h)
