"""DPO losses (shared by MAH-DPO and its single-head baselines; log-probs: pipeline.models.logps).

    h      = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps = label_smoothing, cDPO)
    ipo      (h - 1 / (2 beta))^2, with every log pi in h divided by its completion's token count
             (TRL's convention: length-averaged log-probs, so beta means what it means in TRL)
Rewards (logged) are beta (log pi - log pi_ref) of chosen and rejected (length-averaged for ipo).

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`): each pair's loss
plus alpha times the chosen response's negative log-likelihood per token, -log pi(y_w) / |y_w|, under the
pair's head. It holds up the chosen responses' likelihood, which plain DPO lets fall with the rejected's
(a policy that then drifts into text neither response had: loops). TRL averages the NLL over all chosen
tokens of the batch; here per pair, so it is averaged per head like the DPO term.

MODPO (Zhou et al. 2024), for a weight vector w and a pair of objective k whose responses are
also scored on the other objectives (r_j, j != k):
    -log sigma((beta h - sum_{j != k} w_j (r_j(y_w) - r_j(y_l))) / w_k)
One policy per w; every objective's pairs share the same optimum, pi_ref exp(w . r / beta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, lengths: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Per-pair losses and the (detached) chosen / rejected rewards. Log-probs are sums over the
    completion; `lengths` (chosen, rejected completion token counts) is required by ipo."""
    if loss_type == "ipo":
        if lengths is None:
            raise ValueError("loss_type ipo averages log-probs over completion tokens: pass lengths=(chosen, rejected)")
        n_c, n_r = (x.to(pol_chosen.device, pol_chosen.dtype).clamp(min=1) for x in lengths)
        pol_chosen, ref_chosen, pol_rejected, ref_rejected = (
            pol_chosen / n_c, ref_chosen / n_c, pol_rejected / n_r, ref_rejected / n_r)
    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: use one of {LOSS_TYPES}")
    return loss, beta * (pol_chosen - ref_chosen).detach(), beta * (pol_rejected - ref_rejected).detach()


def rpo_nll(pol_chosen: torch.Tensor, n_chosen: torch.Tensor) -> torch.Tensor:
    """Per-pair NLL of the chosen completion per token (RPO's term; `n_chosen`: its token counts)."""
    return -pol_chosen / n_chosen.to(pol_chosen.device, pol_chosen.dtype).clamp(min=1)


def completion_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Completion token count per row (labels other than -100, after the causal shift)."""
    return (labels[:, 1:] != -100).sum(-1)


def modpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float, scale: torch.Tensor,
               margin: torch.Tensor, label_smoothing: float = 0.0):
    """Per-pair MODPO losses (scale = w_k, margin = the other objectives' weighted score margin)
    and the (detached) chosen / rejected rewards."""
    h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    z = (beta * h - margin) / scale
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * (pol_chosen - ref_chosen).detach(), beta * (pol_rejected - ref_rejected).detach()


def per_head_loss(losses: torch.Tensor, heads: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, dict]:
    """L = sum_i a_i mean_{pairs of head i} L_pair / sum_i a_i over the heads present (the paper: a_i = 1/H)."""
    total, norm, present = 0.0, 0.0, {}
    for i in torch.unique(heads).tolist():
        m = heads == i
        present[i] = m
        total = total + weights[i] * losses[m].mean()
        norm += weights[i]
    return total / norm, present
