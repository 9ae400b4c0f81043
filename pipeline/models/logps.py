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
