"""The multi-head policy of MAH-DPO: one shared backbone, one LM head per objective.

    logits_i = W_i h            (h: the backbone's last hidden state)
    mixed    = sum_i w_i W_i h  (a logit mixture; equal to one merged head sum_i w_i W_i)

Heads are one parameter `heads` [H, vocab, hidden], separate from the input
embeddings even when the base model ties them (a head trained for one objective
must not move the embeddings of every other). Each head starts from the SFT
model's LM head plus `noise_std` Gaussian noise (seed `seed + i`).

Forward computes, for each example, only the logits it needs: the head it is
routed to (`head_ids`, training) or the weighted mix (`weights`, inference), so a
batch costs one vocabulary projection per example whatever H is. The paper's code
computed all H heads for every example ([H, B, T, V]) and kept H reference heads.

Checkpoint (safetensors only): the backbone as a Hugging Face directory (its own
LM head, unused, included), `heads.safetensors` and `multihead_config.json`
(objectives in head order). `export_merged(weights, dir)` writes an ordinary
single-head causal LM (untied head = sum_i w_i W_i) that transformers and vLLM load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from pipeline.models.tokenize import IGNORE

HEADS_FILE, CONFIG_FILE = "heads.safetensors", "multihead_config.json"


class IncompleteCheckpointError(ValueError):
    pass


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [B]


def load_checked(path: str | Path, dtype: str = "float32"):
    """A causal LM from a safetensors directory, refusing one where any weight was not loaded.

    The paper's released code loaded its SFT archive with strict=False under different
    key names, so no weight was loaded and nothing said so.
    """
    from pipeline.models.checkpoint import load_causal_lm

    model, info = load_causal_lm(path, dtype=dtype, output_loading_info=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    bad = missing + sorted(info.get("mismatched_keys", ()) or ()) + list(info.get("error_msgs", ()))
    if bad:
        raise IncompleteCheckpointError(f"{path}: {len(bad)} weights were not loaded from the checkpoint: "
                                        f"{', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''}")
    return model


def validate_weights(weights, objectives: list[str]) -> list[float]:
    """Weights as a normalised list in head order, from a list or an {objective: weight} dict."""
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(objectives))
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; this model's objectives are {objectives}")
        weights = [float(weights.get(o, 0.0)) for o in objectives]
    w = [float(x) for x in weights]
    if len(w) != len(objectives):
        raise ValueError(f"{len(w)} weights for {len(objectives)} objectives {objectives}")
    if any(x != x or x in (float("inf"), float("-inf")) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    if any(x < 0 for x in w):
        raise ValueError(f"weights must be non-negative, got {w}")
    if sum(w) <= 0:
        raise ValueError("weights must not all be zero")
    return [x / sum(w) for x in w]


class MultiHeadPolicy(nn.Module):
    def __init__(self, base, objectives: list[str], heads: torch.Tensor | None = None,
                 noise_std: float = 1e-3, seed: int = 0):
        super().__init__()
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must be distinct and non-empty, got {objectives}")
        self.base, self.objectives = base, list(objectives)
        self.config = base.config
        w = base.get_output_embeddings().weight
        if heads is None:
            heads = torch.stack([w.detach().float() + noise_std * torch.randn(
                w.shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(objectives))])
        if tuple(heads.shape) != (len(objectives), *w.shape):
            raise ValueError(f"heads have shape {tuple(heads.shape)}, expected {(len(objectives), *w.shape)}")
        self.heads = nn.Parameter(heads.to(w.dtype).clone())
        # The base's own LM head is not used; when it is not the (shared) embedding, freeze it.
        if w is not base.get_input_embeddings().weight:
            w.requires_grad_(False)

    @property
    def device(self):
        return self.heads.device

    def hidden(self, input_ids, attention_mask=None, **kw):
        return self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def forward(self, input_ids, attention_mask=None, head_ids=None, weights=None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0, position_ids=None, heads=None, labels=None):
        """Logits of each example's routed head (`head_ids`: int or [B]) or of its mix (`weights`: [H] or [B, H]).
        `heads` ([U, vocab, hidden]) replaces the model's heads for `head_ids`: merged heads computed once
        per weight vector (see merge_rows), so a mix costs one projection per token.
        With `labels` (and `head_ids`): SequenceLogps, each row's summed log-probs of its labelled tokens."""
        if (head_ids is None) == (weights is None):
            raise ValueError("pass exactly one of head_ids (training) or weights (mixing)")
        out = self.hidden(input_ids, attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                          position_ids=position_ids)
        h = out.last_hidden_state
        if labels is not None:
            return SequenceLogps(self.labelled_logps(h, head_ids, labels))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if head_ids is not None:
            logits = self.routed_logits(h, head_ids, heads)
        else:
            logits = self.mixed_logits(h, weights)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)

    def merge_rows(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged heads [U, vocab, hidden] for the U distinct rows of weights [B, H], row -> index [B])."""
        uniq, inverse = torch.unique(weights.to(self.heads.dtype), dim=0, return_inverse=True)
        return torch.einsum("uh,hvd->uvd", uniq.to(self.heads.device), self.heads), inverse

    def labelled_logps(self, h: torch.Tensor, head_ids, labels: torch.Tensor) -> torch.Tensor:
        """[B] sums of log p(label) under each row's head. Only labelled positions are projected on the
        vocabulary: prompt and padding never cost a [vocab] row (nor its float32 log-softmax)."""
        tgt = labels[:, 1:]
        rows, cols = (tgt != IGNORE).nonzero(as_tuple=True)
        ids = torch.as_tensor(head_ids, device=h.device).expand(h.shape[0]) if isinstance(head_ids, int) \
            else torch.as_tensor(head_ids, device=h.device)
        # float32: bf16 log-probs summed over hundreds of tokens lose the margin
        logits = self.routed_logits(h[:, :-1][rows, cols], ids[rows]).float()
        lp = logits.gather(1, tgt[rows, cols].unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
        return torch.zeros(h.shape[0], dtype=lp.dtype, device=h.device).index_add(0, rows, lp)

    def routed_logits(self, h: torch.Tensor, head_ids, heads=None) -> torch.Tensor:
        W = self.heads if heads is None else heads
        if isinstance(head_ids, int):
            return h @ W[head_ids].T
        head_ids = torch.as_tensor(head_ids, device=h.device)
        groups = [(int(i), (head_ids == i).nonzero().squeeze(1)) for i in torch.unique(head_ids)]
        if len(groups) == 1:
            return h @ W[groups[0][0]].T
        parts = [h.index_select(0, idx) @ W[i].T for i, idx in groups]
        order = torch.cat([idx for _, idx in groups])
        return torch.cat(parts).index_select(0, torch.argsort(order))

    def mixed_logits(self, h: torch.Tensor, weights) -> torch.Tensor:
        w = torch.as_tensor(weights, dtype=h.dtype, device=h.device)
        if w.dim() == 1:  # one mix for the batch: a single merged head
            return h @ torch.einsum("i,ivd->vd", w, self.heads).T
        # One mix per example: sum_i w_bi (W_i h_b), H projections (requests with different
        # weights share the batch; each head's weights are read once).
        logits = None
        for i in range(self.heads.shape[0]):
            if bool((w[:, i] == 0).all()):
                continue
            z = (h @ self.heads[i].T) * w[:, i].view(-1, *([1] * (h.dim() - 1)))
            logits = z if logits is None else logits + z
        return logits

    def merged_head(self, weights) -> torch.Tensor:
        w = torch.tensor(validate_weights(weights, self.objectives), dtype=torch.float32)
        return torch.einsum("i,ivd->vd", w, self.heads.detach().float().cpu())

    # --- checkpoints -------------------------------------------------------------
    def save(self, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Save atomically: backbone + tokenizer (Hugging Face), heads, config."""
        from safetensors.torch import save_file

        from pipeline.models.checkpoint import save_pretrained

        sd = state_dict if state_dict is not None else self.state_dict()
        heads = sd["heads"].detach().cpu().contiguous()
        base_sd = {k[len("base."):]: v for k, v in sd.items() if k.startswith("base.")}
        out = Path(out_dir)

        def extra(tmp: Path):
            save_file({"heads": heads}, str(tmp / HEADS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps({"objectives": self.objectives}, indent=1))

        return save_pretrained(self.base, tokenizer, out, state_dict=base_sd, extra=extra)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32") -> "MultiHeadPolicy":
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{p}: no {CONFIG_FILE}; not a multi-head checkpoint (build one with "
                                    "MultiHeadPolicy.from_sft)")
        objectives = json.loads((p / CONFIG_FILE).read_text())["objectives"]
        base = load_checked(p, dtype)
        return cls(base, objectives, heads=load_file(str(p / HEADS_FILE))["heads"])

    @classmethod
    def from_sft(cls, path: str | Path, objectives: list[str], noise_std: float = 1e-3, seed: int = 0,
                 dtype: str = "float32") -> "MultiHeadPolicy":
        """Every head from the SFT model's LM head (+ seeded noise); every SFT weight checked as loaded."""
        return cls(load_checked(path, dtype), objectives, noise_std=noise_std, seed=seed)

    def export_merged(self, weights, out_dir: str | Path, tokenizer=None) -> Path:
        """An ordinary single-head causal LM whose (untied) LM head is sum_i w_i W_i."""
        import copy

        from pipeline.models.checkpoint import save_pretrained

        base = copy.deepcopy(self.base).cpu()
        head = self.merged_head(weights).to(base.get_input_embeddings().weight.dtype)
        if base.config.tie_word_embeddings:
            base.config.tie_word_embeddings = False
            if hasattr(base.config, "get_text_config"):
                base.config.get_text_config().tie_word_embeddings = False
            out_emb = nn.Linear(head.shape[1], head.shape[0], bias=False)
            base.set_output_embeddings(out_emb)
        base.get_output_embeddings().weight = nn.Parameter(head.clone())
        sd = {k: v.contiguous() for k, v in base.state_dict().items()}
        return save_pretrained(base, tokenizer, out_dir, state_dict=sd)
