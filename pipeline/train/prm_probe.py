"""Linear-probe start for the PRM's value head (LP-FT: Kumar et al., 2022).

Before fine-tuning, the backbone's hidden states at the step separators are read once
(no gradient) and each objective's head is fitted on them: logistic regression for
hard labels, least squares for soft ones (the losses training uses), L2-regularised
on standardised features. Fine-tuning then starts from a head that already ranks.

Why: SmolLM2's hidden states have a few outlier dimensions (norm ~55, one dimension
~40), and Adam moves every head weight by the same step, so a head trained from zero
learned the outliers (position in the response) long before the content. On the
built-in tasks a probe of the SFT model's frozen features ranked concision at AUROC
0.93 on held-out prompts where 34 steps of fine-tuning from zero reached 0.64
(docs/prm.md). Outcome (Bradley-Terry) objectives keep zero weights: only their
differences within a prompt are trained.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.models.precision import dtype_name, resolve_dtype

log = logging.getLogger(__name__)


@torch.no_grad()
def step_features(model, tok, examples: list[dict], max_length: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states at every kept SEP of merged examples ([n_steps, hidden]) and their label
    vectors ([n_steps, n_objectives], NaN where missing)."""
    from tqdm import tqdm

    from pipeline.models.prm import encode_steps
    from pipeline.models.collate import PRMCollate

    dev = next(model.parameters()).device
    collate = PRMCollate(tok.pad_token_id if tok.pad_token_id is not None else 0, len(model.objectives))
    feats, labels = [], []
    for i in tqdm(range(0, len(examples), batch_size), desc="probe features", mininterval=10):
        encs = [encode_steps(tok, e["prompt"], e["completions"], model.sep_id, max_length, e["labels"])
                for e in examples[i: i + batch_size]]
        b = collate({"input_ids": [e["input_ids"] for e in encs], "positions": [e["positions"] for e in encs],
                     "labels": [np.ravel(e["labels"]) for e in encs], "prompt_hash": np.zeros(len(encs))})
        h = model.backbone(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).last_hidden_state
        at_sep = h.gather(1, b["positions"].to(dev).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        mask = b["step_mask"] > 0
        feats.append(at_sep.float().cpu()[mask].numpy())
        labels.append(b["labels"][mask].numpy().astype(np.float64))
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)


def fit_head(x: np.ndarray, y: np.ndarray, kinds: list[str], c: float, priors: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per objective: (weight [n_obj, hidden], bias [n_obj]) in the raw feature space, fitted on
    standardised features with the training loss + ||w||^2 / (2 c n) (c as in scikit-learn's C).
    An objective with fewer than 2 labels or one class (hard) keeps zero weights and its prior."""
    n_obj = len(kinds)
    weight, bias = np.zeros((n_obj, x.shape[1])), np.asarray(priors, dtype=np.float64).copy()
    for j, kind in enumerate(kinds):
        keep = ~np.isnan(y[:, j])
        xs, ys = x[keep], y[keep, j]
        if kind == "outcome" or len(ys) < 2 or (kind == "hard" and len(set(ys >= 0.5)) < 2):
            continue
        mu, sd = xs.mean(0), xs.std(0) + 1e-6
        z = torch.tensor((xs - mu) / sd)
        t = torch.tensor(ys)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            w[-1] = bias[j]
        opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            out = z @ w[:-1] + w[-1]
            fit = (torch.nn.functional.mse_loss(out, t) if kind == "soft"
                   else torch.nn.functional.binary_cross_entropy_with_logits(out, t))
            loss = fit + (w[:-1] ** 2).sum() / (2 * c * len(ys))
            loss.backward()
            return loss

        opt.step(closure)
        ws, b = w[:-1].detach().numpy(), float(w[-1].detach())
        weight[j] = ws / sd  # z = (x - mu) / sd  =>  w.z + b = (w / sd).x + (b - w.(mu / sd))
        bias[j] = b - float(ws @ (mu / sd))
    return weight, bias


def probe_head(model_dir: str, objectives: list[str], kinds: list[str], separator: str, priors: list[float],
               train: list[dict], evals: list[dict], max_length: int, c: float, bf16: bool, use_gpu: bool) -> dict:
    """Fit the head on the training examples' features; returns {"weight", "bias"} (lists, for
    build_prm) and the probe's metrics on the held-out examples."""
    from pipeline.models.prm import build_prm
    from pipeline.train.prm_metrics import objective_metrics

    dtype = getattr(torch, resolve_dtype(dtype_name(bf16)))  # the features training starts from
    model, tok = build_prm(model_dir, objectives, dict(zip(objectives, kinds)), separator, dtype=dtype)
    model.eval().to("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    x, y = step_features(model, tok, train, max_length)
    weight, bias = fit_head(x, y, kinds, c, priors)
    metrics = {}
    if evals:
        xe, ye = step_features(model, tok, evals, max_length)
        pe = xe @ weight.T + bias
        for j, (name, kind) in enumerate(zip(objectives, kinds)):
            if kind != "outcome":  # no prompt groups here; the probe leaves outcome heads at zero anyway
                for k, v in objective_metrics(kind, pe[:, j], ye[:, j]).items():
                    metrics[f"probe/{name}/{k}"] = float(v)
    log.info("fit_prm: linear probe on %d steps of %d examples; held-out: %s", len(x), len(train),
             {k: round(v, 3) for k, v in metrics.items() if k.endswith("auroc")})
    return {"weight": weight.tolist(), "bias": bias.tolist(), "metrics": metrics}
