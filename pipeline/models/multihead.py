"""The multi-head policy of MAH-DPO: one shared backbone, one LM head per objective.

    logits_i = W_i h            (h: the backbone's last hidden state)
    mixed    = sum_i w_i W_i h  (a logit mixture; equal to one merged head sum_i w_i W_i)

Heads are one parameter `heads` [H, vocab, hidden], separate from the input
embeddings even when the base model ties them (a head trained for one objective
must not move the embeddings of every other). Each head starts from the SFT
model's LM head plus `noise_std` Gaussian noise (seed `seed + i`).

Low-rank heads (`head_rank` r > 0, opt-in): W_i = W_0 + U_i D_i, with W_0 the SFT head
(frozen, shared) and only U_i [vocab, r] (zero at start) and D_i [r, hidden] (seeded
Gaussian) trained. An extra head then costs r (vocab + hidden) trainable parameters
instead of vocab x hidden (with their gradients and Adam state: 16 bytes each in fp32),
so 3 heads cost what 1 head costs; each head's change from the SFT head has rank r.
Heads start at the SFT head exactly (no noise: the routed pairs make them differ), and
saving writes the full heads, so every checkpoint has the same format.

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
from transformers.utils import ModelOutput

from pipeline.models.checkpoint import gathered
from pipeline.models.tokenize import IGNORE

HEADS_FILE, CONFIG_FILE = "heads.safetensors", "multihead_config.json"
CHUNK_TOKENS = 512  # labelled tokens projected on the vocabulary at once in training


class IncompleteCheckpointError(ValueError):
    pass


@dataclass
class SequenceLogps(ModelOutput):
    """[B] summed log-probs. A ModelOutput (a dict) so that ZeRO-3 finds the tensor and gathers the
    partitioned parameters again for backward (it does not look inside other classes)."""
    logps: torch.Tensor | None = None


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
    total = sum(w)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    if total == float("inf"):  # each finite, their sum not: x / inf would be 0 for all, silently
        raise ValueError(f"weights sum beyond the float range ({w}); scale them down")
    return [x / total for x in w]


class _HeadProjection(torch.autograd.Function):
    """Each group of hidden states [n_g, hidden] on its head: heads[i_g] h. Backward writes every
    head's weight gradient into one [H, vocab, hidden] tensor, which becomes `heads.grad`; autograd's
    own indexing would make a zero-filled [H, vocab, hidden] gradient per head used and add them up,
    at the start of backward, when the activations are all still held (measured: 415 MiB more
    peak memory for 3 SmolLM2 heads in fp32)."""

    @staticmethod
    def forward(ctx, heads, index, *hs):
        # an alias of the values, not the parameter: ZeRO-3 empties the parameter after forward (its
        # partition), the alias keeps the gathered values for backward as a view saved by matmul would
        ctx.index, ctx.heads = index, heads.detach()
        ctx.save_for_backward(*hs)
        return tuple(h @ heads[i].T for i, h in zip(index, hs))

    @staticmethod
    def backward(ctx, *grads):
        heads, hs = ctx.heads, ctx.saved_tensors
        grad_heads = torch.zeros_like(heads) if ctx.needs_input_grad[0] else None
        grad_hs = []
        for i, h, g in zip(ctx.index, hs, grads):
            if grad_heads is not None:
                grad_heads[i].addmm_(g.T, h)
            grad_hs.append(g @ heads[i])
        return (grad_heads, None, *grad_hs)


def freeze_below(model, train_layers: int) -> None:
    """Freeze the input embedding and every decoder layer below the top `train_layers`: backward stops
    at the lowest trainable layer, so a step costs the forward plus the top layers' backward (on a
    CPU the cost of DPO is bounded by it; docs/policy.md). The final norm stays trainable."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to freeze below (dpo.train_layers)")
    if not 0 < train_layers <= len(layers):
        raise ValueError(f"dpo.train_layers must be in 1..{len(layers)} for this model, got {train_layers}")
    model.get_input_embeddings().weight.requires_grad_(False)
    for layer in layers[: len(layers) - train_layers]:
        layer.requires_grad_(False)


class MultiHeadPolicy(nn.Module):
    def __init__(self, base, objectives: list[str], heads: torch.Tensor | None = None,
                 noise_std: float = 1e-3, seed: int = 0, head_rank: int = 0):
        super().__init__()
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must be distinct and non-empty, got {objectives}")
        if head_rank < 0 or (head_rank and heads is not None):
            raise ValueError(f"head_rank must be >= 0 (got {head_rank}), and low-rank heads start from the SFT head "
                             "(no `heads`)")
        self.base, self.objectives, self.head_rank = base, list(objectives), int(head_rank)
        self.config = base.config
        w = base.get_output_embeddings().weight
        # under ZeRO-3 (zero.Init) w is this process's partition: the heads are built from the whole
        # SFT head (the same in every process), and DeepSpeed partitions them in turn
        with gathered(w):
            if head_rank:
                H, (V, d) = len(objectives), w.shape
                # a copy: with tied embeddings w keeps training as the input embedding
                self.head_base = nn.Parameter(w.detach().clone(), requires_grad=False)
                self.head_up = nn.Parameter(torch.zeros(H, V, head_rank, dtype=w.dtype))
                # D_i rows of norm ~ sqrt(hidden / r): U_i's first Adam steps move the logits by O(lr sqrt(r hidden))
                self.head_down = nn.Parameter(torch.stack([torch.randn(
                    head_rank, d, generator=torch.Generator().manual_seed(seed + i)) / head_rank ** 0.5
                    for i in range(H)]).to(w.dtype))
            else:
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
        return (self.head_base if self.head_rank else self.heads).device

    def head_stack(self) -> torch.Tensor:
        """All heads as one [H, vocab, hidden] tensor (low-rank heads: materialised, W_0 + U_i D_i)."""
        if not self.head_rank:
            return self.heads
        return self.head_base + torch.einsum("hvr,hrd->hvd", self.head_up, self.head_down)

    def hidden(self, input_ids, attention_mask=None, **kw):
        return self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def forward(self, input_ids, attention_mask=None, head_ids=None, weights=None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0, position_ids=None, heads=None, labels=None,
                packed: bool = False):
        """Logits of each example's routed head (`head_ids`: int or [B]) or of its mix (`weights`: [H] or [B, H]).
        `heads` ([U, vocab, hidden]) replaces the model's heads for `head_ids`: merged heads computed once
        per weight vector (see merge_rows), so a mix costs one projection per token.
        With `labels` (and `head_ids`): SequenceLogps, each row's summed log-probs of its labelled tokens;
        `packed` runs the backbone on the right-padded rows packed into one (models.logps.packed_hidden):
        the same values, no compute on padding."""
        if (head_ids is None) == (weights is None):
            raise ValueError("pass exactly one of head_ids (training) or weights (mixing)")
        if packed:
            if labels is None or attention_mask is None or past_key_values is not None:
                raise ValueError("packed: only for scoring labelled, right-padded rows (labels and attention_mask, "
                                 "no cache)")
            from pipeline.models.logps import packed_hidden

            return SequenceLogps(self.labelled_logps(packed_hidden(self.base.get_decoder(), input_ids, attention_mask),
                                                     head_ids, labels))
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
        W = self.head_stack()
        uniq, inverse = torch.unique(weights.to(W.dtype), dim=0, return_inverse=True)
        return torch.einsum("uh,hvd->uvd", uniq.to(W.device), W), inverse

    def labelled_logps(self, h: torch.Tensor, head_ids, labels: torch.Tensor) -> torch.Tensor:
        """[B] sums of log p(label) under each row's head. Only labelled positions are projected on the
        vocabulary: prompt and padding never cost a [vocab] row (nor its float32 log-softmax). Each
        head's tokens are reduced to log-probs on their own, so no [tokens, vocab] tensor is
        concatenated or reordered (two more copies of the largest activation, forward and backward)."""
        tgt = labels[:, 1:]
        rows, cols = (tgt != IGNORE).nonzero(as_tuple=True)
        ids = torch.as_tensor(head_ids, device=h.device).expand(h.shape[0]) if isinstance(head_ids, int) \
            else torch.as_tensor(head_ids, device=h.device)
        hs, ys, hid = h[:, :-1][rows, cols], tgt[rows, cols], ids[rows]
        # per head, in chunks of CHUNK_TOKENS: the float32 log-softmax's temporaries and the backward's
        # [tokens, vocab] gradients are one chunk's, not the batch's
        groups = [(i, sel) for i in torch.unique(hid).tolist()
                  for sel in (hid == i).nonzero().squeeze(1).split(CHUNK_TOKENS)]
        parts = [hs.index_select(0, sel) for _, sel in groups]
        if self.head_rank:
            logits = [self.project(x, i) for (i, _), x in zip(groups, parts)]
        else:
            logits = _HeadProjection.apply(self.heads, [i for i, _ in groups], *parts)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for (i, sel), z in zip(groups, logits):
            z = z.float()  # float32: bf16 log-probs summed over hundreds of tokens lose the margin
            lp = z.gather(1, ys.index_select(0, sel).unsqueeze(1)).squeeze(1) - z.logsumexp(-1)
            out = out.index_add(0, rows.index_select(0, sel), lp)
        return out

    def project(self, h: torch.Tensor, i: int, heads=None) -> torch.Tensor:
        """h [..., hidden] on head i's vocabulary (of `heads` when given). A low-rank head is never
        materialised: W_0 h + U_i (D_i h)."""
        if heads is not None:
            return h @ heads[i].T
        if not self.head_rank:
            return h @ self.heads[i].T
        z = h.reshape(-1, h.shape[-1])
        # in place on W_0 h: one [tokens, vocab] tensor, not three (autograd keeps z and the factors only)
        out = (z @ self.head_base.T).addmm_(z @ self.head_down[i].T, self.head_up[i].T)
        return out.view(*h.shape[:-1], out.shape[-1])

    def routed_logits(self, h: torch.Tensor, head_ids, heads=None) -> torch.Tensor:
        if isinstance(head_ids, int):
            return self.project(h, head_ids, heads)
        head_ids = torch.as_tensor(head_ids, device=h.device)
        groups = [(int(i), (head_ids == i).nonzero().squeeze(1)) for i in torch.unique(head_ids)]
        if len(groups) == 1:
            return self.project(h, groups[0][0], heads)
        parts = [self.project(h.index_select(0, idx), i, heads) for i, idx in groups]
        order = torch.cat([idx for _, idx in groups])
        return torch.cat(parts).index_select(0, torch.argsort(order))

    def mixed_logits(self, h: torch.Tensor, weights) -> torch.Tensor:
        w = torch.as_tensor(weights, dtype=h.dtype, device=h.device)
        W = self.head_stack()
        if w.dim() == 1:  # one mix for the batch: a single merged head
            return h @ torch.einsum("i,ivd->vd", w, W).T
        # One mix per example: sum_i w_bi (W_i h_b), H projections (requests with different
        # weights share the batch; each head's weights are read once).
        logits = None
        for i in range(W.shape[0]):
            if bool((w[:, i] == 0).all()):
                continue
            z = (h @ W[i].T) * w[:, i].view(-1, *([1] * (h.dim() - 1)))
            logits = z if logits is None else logits + z
        return logits

    def merged_head(self, weights) -> torch.Tensor:
        w = torch.tensor(validate_weights(weights, self.objectives), dtype=torch.float32)
        return torch.einsum("i,ivd->vd", w, self.head_stack().detach().float().cpu())

    # --- checkpoints -------------------------------------------------------------
    def save(self, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Save atomically: backbone + tokenizer (Hugging Face), heads, config."""
        from safetensors.torch import save_file

        from pipeline.models.checkpoint import save_pretrained

        sd = state_dict if state_dict is not None else self.state_dict()
        if self.head_rank:  # the full heads: loading needs no rank, every reader the same format
            up, down = (sd[k].detach().cpu().float() for k in ("head_up", "head_down"))
            heads = (sd["head_base"].detach().cpu().float() + torch.einsum("hvr,hrd->hvd", up, down)).to(
                sd["head_base"].dtype).contiguous()
        else:
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
                 dtype: str = "float32", head_rank: int = 0, train_layers: int = 0) -> "MultiHeadPolicy":
        """Every head from the SFT model's LM head (+ seeded noise, or low-rank); every SFT weight checked
        as loaded. train_layers > 0: only the top train_layers decoder layers (+ final norm, heads) train."""
        policy = cls(load_checked(path, dtype), objectives, noise_std=noise_std, seed=seed, head_rank=head_rank)
        if train_layers:
            freeze_below(policy.base, train_layers)
        return policy

    def export_merged(self, weights, out_dir: str | Path, tokenizer=None, dtype: str | None = None) -> Path:
        """An ordinary single-head causal LM whose (untied) LM head is sum_i w_i W_i, saved in `dtype`
        ("auto" resolves; None: the model's own): the dtype of the engine that loads it, which otherwise
        casts every tensor and says so (vLLM: one warning per weight)."""
        import copy

        from pipeline.models.checkpoint import DTYPES, save_pretrained
        from pipeline.models.precision import resolve_dtype

        base = copy.deepcopy(self.base).cpu()
        if dtype is not None:
            base = base.to(DTYPES[resolve_dtype(dtype)])
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
