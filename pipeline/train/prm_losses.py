"""PRM losses by label kind, with missing labels masked (NaN = no label, never 0).

    soft     MSE between the raw output and the target (MC values, hindsight targets);
    hard     binary cross-entropy on the output as a logit (judge votes, dialogue prefixes);
    outcome  Bradley-Terry on pairs of responses to the same prompt: -log sigmoid(r_w - r_l)
             with r read at each response's last step. Pairs form within a micro-batch, so
             training rows are prompt groups (pipeline.train.prm.group_examples): every pair
             of a prompt is in the micro-batch that holds its group.
Each objective's loss is the mean over its labelled steps (or pairs); the total is the
weighted mean over the objectives present in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_step_losses(pred: torch.Tensor, labels: torch.Tensor, kinds: list[str]) -> dict[int, torch.Tensor]:
    """pred, labels: [batch, steps, n_obj] (labels NaN where missing). -> {objective index: mean loss}
    for every soft/hard objective with at least one label in the batch."""
    out = {}
    for j, kind in enumerate(kinds):
        if kind == "outcome":
            continue
        y, p = labels[..., j], pred[..., j]
        mask = ~torch.isnan(y)
        if not mask.any():
            continue
        y, p = y[mask], p[mask].float()
        out[j] = F.mse_loss(p, y) if kind == "soft" else F.binary_cross_entropy_with_logits(p, y)
    return out


def bradley_terry(last_rewards: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """last_rewards: [batch] rewards of one objective; pairs: [n_pairs, 2] (winner, loser) indices."""
    return -F.logsigmoid(last_rewards[pairs[:, 0]] - last_rewards[pairs[:, 1]]).mean()


def outcome_pairs(prompt_ids: list, scores: list[float | None]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs among responses to the same prompt with different outcome scores."""
    pairs = []
    for a in range(len(scores)):
        for b in range(len(scores)):
            sa, sb = scores[a], scores[b]
            if a != b and prompt_ids[a] == prompt_ids[b] and sa is not None and sb is not None and sa > sb:
                pairs.append((a, b))
    return pairs


def combine(losses: dict[int, torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean over the objectives present in the batch."""
    if not losses:
        raise ValueError("no objective has a label in this batch")
    w = torch.tensor([weights[j] for j in losses], dtype=torch.float32)
    vals = torch.stack([losses[j].float() for j in losses])
    return (vals * w.to(vals.device)).sum() / w.sum()
