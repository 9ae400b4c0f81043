"""The vectorized process reward model: one backbone, one output per objective.

A response is encoded as prompt (chat template) + step_1 SEP step_2 SEP ... step_n SEP,
where SEP is a separator token (default "<|step|>", added to the tokenizer when it
lacks it). One forward pass gives, at every SEP position, a vector with one reward
per objective. Dialogues use the same layout with one SEP per policy turn.

Checkpoint layout (safetensors only): the backbone and tokenizer as a Hugging Face
directory, plus `prm_head.safetensors` and `prm_config.json` (objectives in head
order, their label kinds, the separator).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DEFAULT_SEPARATOR = "<|step|>"
LABEL_KINDS = ("soft", "hard", "outcome")


def reward_link(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """One objective's raw outputs (its head's own units) -> rewards on the common scale [0, 1],
    "probability-like", so objectives of different kinds can be compared, mixed and differenced:

        soft     clamp(value, 0, 1): the value head regresses success rates, already in [0, 1]
                 (MSE can overshoot a little; a value past a bound means "at the bound");
        hard     sigmoid(logit): the classifier's P(good step);
        outcome  sigmoid(score): Bradley-Terry's P(this response beats one scored 0). Only score
                 differences are trained, so 0 is an arbitrary centre; the map is monotone, so the
                 ranking within the objective is the score's, and differences near the centre are
                 score differences / 4.

    NaN (a step cut by truncation) stays NaN."""
    if kind == "soft":
        return raw.clamp(0.0, 1.0)
    if kind in ("hard", "outcome"):
        return torch.sigmoid(raw)
    raise ValueError(f"unknown label kind {kind!r}; use one of {LABEL_KINDS}")


def add_separator(tokenizer, separator: str = DEFAULT_SEPARATOR) -> int:
    """The separator's token id, adding it as a special token when the vocabulary lacks it."""
    if separator not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [separator]})
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"separator {separator!r} is not one token for this tokenizer ({ids})")
    return ids[0]


def encode_steps(tokenizer, prompt: list[dict], steps: list[str], sep_id: int, max_length: int,
                 labels: list[list[float | None]] | None = None) -> dict:
    """input_ids, the SEP positions, and (optionally) per-step label vectors.

    When the text is longer than max_length the prompt is kept and the response is cut:
    steps whose SEP falls past the cut are dropped with their labels (never scored as
    something else). A prompt longer than max_length keeps its last max_length // 2 tokens.
    """
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(ids) > max_length // 2 and len(ids) + 1 > max_length:
        ids = ids[-(max_length // 2):]
    positions = []
    for step in steps:
        piece = tokenizer(step, add_special_tokens=False)["input_ids"] + [sep_id]
        if len(ids) + len(piece) > max_length:
            break
        ids += piece
        positions.append(len(ids) - 1)
    out = {"input_ids": ids, "positions": positions, "n_steps": len(steps)}
    if labels is not None:
        out["labels"] = [[float("nan") if x is None else float(x) for x in row] for row in labels[: len(positions)]]
    return out


class VectorPRM(nn.Module):
    """backbone (any Hugging Face base model) + Linear(hidden, n_objectives) read at SEP positions."""

    def __init__(self, backbone: nn.Module, objectives: list[str], label_kinds: dict[str, str],
                 separator: str = DEFAULT_SEPARATOR, sep_id: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.objectives, self.label_kinds = list(objectives), dict(label_kinds)
        self.separator, self.sep_id = separator, sep_id
        hidden = backbone.config.hidden_size
        # Same dtype as the backbone: under ZeRO-3 the backbone comes out of zero.Init already in
        # the training dtype, and DeepSpeed partitions one dtype only.
        self.head = nn.Linear(hidden, len(objectives), dtype=backbone.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):  # DeepSpeed and the harness look for .config
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, step_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (raw: values / logits). Without `positions`: at every position,
        [batch, seq, n_objectives]; with them: at the SEP positions, [batch, max_steps, n_objectives]
        (padding steps are zeros; `step_mask` marks the real ones).
        Packed (PRMCollate(packed=True)): input_ids [1, T] holds every response, `position_ids` restart
        per response, `positions` [batch, max_steps] index that one row."""
        kw = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
        # use_cache=False: with a cache transformers ignores packed position ids (one causal mask over all)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        out = self.head(h.to(self.head.weight.dtype))
        if positions is None:
            return out
        if out.shape[0] == 1:
            out = out.expand(positions.shape[0], -1, -1)  # packed: every response reads the one row
        idx = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, out.shape[-1])
        steps = out.gather(1, idx)
        return steps if step_mask is None else steps * step_mask.unsqueeze(-1)

    def step_rewards(self, input_ids, attention_mask, positions: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """Raw outputs at the SEP positions (training): each head in its own units."""
        return self(input_ids, attention_mask, positions, step_mask)

    def to_rewards(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., n_objectives] raw outputs (score, score_last, forward) -> rewards on the common
        [0, 1] scale, each objective through its kind's link (`reward_link`). Every consumer that
        compares or combines objectives (guided decoding, pair selection and margins, MODPO,
        evaluation) reads these, never the raw outputs."""
        if raw.shape[-1] != len(self.objectives):
            raise ValueError(f"to_rewards: last dimension {raw.shape[-1]} is not the PRM's {len(self.objectives)} objectives")
        return torch.stack([reward_link(self.label_kinds[o], raw[..., j]) for j, o in enumerate(self.objectives)], -1)

    @torch.no_grad()
    def rewards(self, tokenizer, prompt: list[dict], steps: list[str], max_length: int = 4096) -> torch.Tensor:
        """[n_steps, n_objectives] rewards on the common scale (`to_rewards` of `score`)."""
        return self.to_rewards(self.score(tokenizer, prompt, steps, max_length))

    @torch.no_grad()
    def rewards_last(self, tokenizer, prompt: list[dict], prefix: list[str], candidates: list[str],
                     max_length: int = 4096) -> torch.Tensor:
        """[K, n_objectives] rewards on the common scale (`to_rewards` of `score_last`)."""
        return self.to_rewards(self.score_last(tokenizer, prompt, prefix, candidates, max_length))

    @torch.no_grad()
    def score(self, tokenizer, prompt: list[dict], steps: list[str], max_length: int = 4096) -> torch.Tensor:
        """[n_steps, n_objectives] raw outputs of one response, each head in its own units (logits,
        values, BT scores; training and metrics), in process (steps cut by truncation: NaN)."""
        enc = encode_steps(tokenizer, prompt, steps, self.sep_id, max_length)
        dev = next(self.parameters()).device
        out = torch.full((len(steps), len(self.objectives)), float("nan"))
        if enc["positions"]:
            r = self(torch.tensor([enc["input_ids"]], device=dev), positions=torch.tensor([enc["positions"]], device=dev))
            out[: len(enc["positions"])] = r[0].float().cpu()
        return out

    @torch.no_grad()
    def score_last(self, tokenizer, prompt: list[dict], prefix: list[str], candidates: list[str],
                   max_length: int = 4096) -> torch.Tensor:
        """[K, n_objectives]: the raw output of each candidate as the next step after `prefix`, one padded
        forward for all K (guided decoding reads `rewards_last`). A candidate cut by max_length scores NaN."""
        return self.score_next(tokenizer, [(prompt, prefix, c) for c in candidates], max_length, len(candidates))

    @torch.no_grad()
    def score_next(self, tokenizer, items: list[tuple[list[dict], list[str], str]], max_length: int = 4096,
                   batch_size: int = 32) -> torch.Tensor:
        """[len(items), n_objectives]: for each (prompt, accepted steps, candidate), the raw output of the
        candidate as the next step, read at its separator; padded forwards of `batch_size` rows (right
        padding: a row's outputs do not depend on its neighbours). Cut by max_length: NaN."""
        out = torch.full((len(items), len(self.objectives)), float("nan"))
        dev = next(self.parameters()).device
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            encs = [encode_steps(tokenizer, p, list(prefix) + [c], self.sep_id, max_length) for p, prefix, c in chunk]
            width = max(len(e["input_ids"]) for e in encs)
            ids = torch.zeros((len(encs), width), dtype=torch.long)
            att = torch.zeros((len(encs), width), dtype=torch.long)
            for i, e in enumerate(encs):
                ids[i, : len(e["input_ids"])], att[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"]), 1
            h = self(ids.to(dev), att.to(dev)).float().cpu()
            for i, (e, (_, prefix, _)) in enumerate(zip(encs, chunk)):
                if len(e["positions"]) == len(prefix) + 1:
                    out[lo + i] = h[i, e["positions"][-1]]
        return out

    def save(self, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from pipeline.models.checkpoint import save_pretrained

        sd = state_dict if state_dict is not None else self.state_dict()
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}

        def head_and_config(tmp: Path) -> None:
            save_file({k[len("head."):]: v.contiguous() for k, v in sd.items() if k.startswith("head.")},
                      str(tmp / "prm_head.safetensors"))
            (tmp / "prm_config.json").write_text(json.dumps(
                {"objectives": self.objectives, "label_kinds": self.label_kinds, "separator": self.separator}, indent=1))

        # atomically (a temporary directory renamed into place): a killed save leaves the old PRM or none
        return save_pretrained(self.backbone, tokenizer, out_dir, state_dict=backbone_sd, extra=head_and_config)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> tuple["VectorPRM", object]:
        """(model, tokenizer) from a directory written by save(); checks every weight loaded."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from pipeline.models.checkpoint import check_safetensors

        p = check_safetensors(path)
        cfg = json.loads((p / "prm_config.json").read_text())
        tok = AutoTokenizer.from_pretrained(str(p))
        backbone = AutoModel.from_pretrained(str(p), dtype=dtype, use_safetensors=True)
        model = cls(backbone, cfg["objectives"], cfg["label_kinds"], cfg["separator"], add_separator(tok, cfg["separator"]))
        model.head.load_state_dict(load_file(str(p / "prm_head.safetensors")), strict=True)  # every weight, or an error
        return model, tok


def build_prm(model_dir: str, objectives: list[str], label_kinds: dict[str, str], separator: str = DEFAULT_SEPARATOR,
              dtype: torch.dtype = torch.float32, head: dict | None = None) -> tuple[VectorPRM, object]:
    """A fresh vectorized PRM on a causal LM's backbone (its LM head is not used).
    `head` ({"bias": [n_obj], "weight": [n_obj][hidden] or absent for zeros}) sets the value
    head's start: the trivial baseline (zero weights, the label prior as bias) or a linear probe
    (pipeline.train.prm_probe); without it the head is random (std 0.02)."""
    from transformers import AutoModel

    from pipeline.models.checkpoint import check_safetensors, gathered, load_tokenizer

    tok = load_tokenizer(str(check_safetensors(model_dir)))
    sep_id = add_separator(tok, separator)
    backbone = AutoModel.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    old = backbone.config.vocab_size  # not weight.shape: under ZeRO-3 the weight is a partition
    if old < len(tok):
        # the new SEP row is the mean embedding, the same in every process: a head fitted on
        # features from one build (the probe) must see the same features in the workers' builds
        backbone.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = backbone.get_input_embeddings().weight
        with gathered(emb, modifier_rank=0), torch.no_grad():
            emb[old:] = emb[:old].mean(0)
    if unknown := set(label_kinds.values()) - set(LABEL_KINDS):
        raise ValueError(f"unknown label kinds {unknown}; use soft, hard or outcome")
    prm = VectorPRM(backbone, objectives, label_kinds, separator, sep_id)
    if head is not None:
        w = prm.head.weight
        with torch.no_grad():
            w.copy_(torch.tensor(head["weight"], dtype=w.dtype) if head.get("weight") is not None else torch.zeros_like(w))
            prm.head.bias.copy_(torch.tensor(head["bias"], dtype=prm.head.bias.dtype))
    return prm, tok


def _messages(prompt):
    """A prompt as chat messages (some shards keep it as a JSON string, so any dialogue fits one column)."""
    return json.loads(prompt) if isinstance(prompt, str) else prompt


class PRMScorer:
    """A Ray Data batch scorer: `ds.map_batches(PRMScorer, fn_constructor_kwargs={"prm_dir": d}, concurrency=n)`.
    Adds `step_rewards` (list per step of one reward per objective, in head order, on the common
    [0, 1] scale of `VectorPRM.rewards`; NaN for a step cut by truncation) to rows with `prompt`
    and `steps` (trajectories) or `completions` (stepwise records)."""

    def __init__(self, prm_dir: str, max_length: int = 4096, device: str | None = None):
        self.model, self.tok = VectorPRM.load(prm_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_length = max_length

    def __call__(self, batch):
        import pyarrow as pa

        col = "steps" if "steps" in batch.column_names else "completions"
        rewards = [self.model.rewards(self.tok, p, s, self.max_length).tolist()
                   for p, s in zip(map(_messages, batch.column("prompt").to_pylist()), batch.column(col).to_pylist())]
        return batch.append_column("step_rewards", pa.array(rewards, pa.list_(pa.list_(pa.float32()))))


class ExternalPRM:
    """Wraps an external PRM that marks steps with a placeholder token (Qwen2.5-Math-PRM's
    "<extra_0>") as the scorer of one objective: the response is
    prompt + step_1 PH step_2 PH ..., and each step's score is read from the model's
    per-token logits at the placeholders: softmax(logits)[index] (`probability`, the
    Qwen PRM's P(good step)), sigmoid of one logit (`sigmoid`), or the raw logit (`logit`).
    `rewards` maps them to the common [0, 1] scale as VectorPRM does: a probability is a soft
    value (clamped), a raw logit goes through the sigmoid (the `hard` link)."""

    SCORES = {"probability": "soft", "sigmoid": "soft", "logit": "hard"}  # score -> the label kind of its link

    def __init__(self, model_dir: str, placeholder: str = "<extra_0>", score: str = "probability", index: int = 1,
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        from pipeline.models.checkpoint import check_safetensors

        if score not in self.SCORES:
            raise ValueError(f"ExternalPRM({model_dir}): score {score!r}; use one of {sorted(self.SCORES)}")
        p = str(check_safetensors(model_dir))
        self.tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
        archs = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code).architectures or []
        # Token-classification PRMs load as such; remote-code PRMs (Qwen) map AutoModel to their class.
        auto = "AutoModelForTokenClassification" if any(a.endswith("ForTokenClassification") for a in archs) else "AutoModel"
        ids = self.tok(placeholder, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{model_dir}: placeholder {placeholder!r} is not one token of its tokenizer")
        self.sep_id, self.score_kind, self.index = ids[0], score, index
        self.model = getattr(transformers, auto).from_pretrained(p, dtype=dtype, trust_remote_code=trust_remote_code).eval()

    @torch.no_grad()
    def score(self, prompt: list[dict], steps: list[str], max_length: int = 4096) -> torch.Tensor:
        """[n_steps] scores in the chosen `score` units (NaN for steps cut by truncation)."""
        enc = encode_steps(self.tok, prompt, steps, self.sep_id, max_length)
        out = torch.full((len(steps),), float("nan"))
        if not enc["positions"]:
            return out
        res = self.model(input_ids=torch.tensor([enc["input_ids"]]))
        if getattr(res, "logits", None) is None:
            raise TypeError(f"{type(self.model).__name__} returns no per-token logits; it is not a placeholder PRM")
        logits = res.logits[0, enc["positions"]].float()
        if self.score_kind == "probability":
            vals = logits.softmax(-1)[:, self.index]
        elif self.score_kind == "sigmoid":
            vals = logits[:, self.index].sigmoid()
        else:
            vals = logits[:, self.index]
        out[: len(vals)] = vals
        return out

    def to_rewards(self, raw: torch.Tensor) -> torch.Tensor:
        """Scores from `score` -> rewards on the common [0, 1] scale (`reward_link`)."""
        return reward_link(self.SCORES[self.score_kind], raw)

    def rewards(self, prompt: list[dict], steps: list[str], max_length: int = 4096) -> torch.Tensor:
        """[n_steps] rewards on the common [0, 1] scale (NaN for steps cut by truncation)."""
        return self.to_rewards(self.score(prompt, steps, max_length))
