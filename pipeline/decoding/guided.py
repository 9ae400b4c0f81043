"""PRM-guided decoding with a continuing KV cache (the paper's algorithm, made runnable).

At each step boundary: K candidate steps are sampled on top of the running cache;
the vectorized PRM scores every candidate as the next step; its rewards, on the
PRM's common [0, 1] scale (`prm.to_rewards`: a classifier's logit through the
sigmoid, a value clamped, ...; never the raw outputs, where a logit head would
outweigh any mix), are combined into the weighted mean under the request's weights; the winner's tokens are kept in the cache, so the
policy never re-encodes the text. The PRM keeps a running cache of its own (prompt
+ accepted steps, each closed by its separator), so it too encodes only the K
candidates' tokens. The mix of heads is merged once per request: one projection
per token.

The K candidates share the prefix instead of copying it K times (`SharedPrefix`):
their tokens are appended to the one batch-1 cache and a 4D attention mask lets each
token see the prefix and its own candidate's earlier tokens only (tree attention,
as speculative decoding verifies draft trees). Each decoding step reads the prefix's
keys once, feeds only the candidates still running, and holds prefix + K x step in
memory rather than K x (prefix + step); the losers' tokens are dropped afterwards.
It needs an attention that takes a 4D mask (`sdpa`, transformers' default, or
`eager`) and a full-attention cache.
Boundaries per domain: `blank_lines` (math), `sentences`
(prose), `turn` (the whole turn: turn-level best-of-K, as the paper does for
tutoring dialogues). Limits: `max_steps`, `max_step_tokens`, `max_new_tokens`.

`reencode=True` runs the same search the way `model.generate(prefix,
num_return_sequences=K)` does it at every step: the accepted tokens (prompt + steps
so far) are encoded again for each of the K candidates, by the policy and by the
PRM (`score_last`). It is the baseline the cache is measured against. (It
re-encodes token ids, not decoded text, so both see the same tokens; the PRM's
input is built step by step in both, so both score the same ids.) Both consume
the random generator identically, so they produce the same tokens up to
floating-point ties; with greedy sampling exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pipeline.decoding.mixing import eos_ids, sample

BOUNDARIES = ("blank_lines", "sentences", "turn")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s|$)")


@dataclass
class GuidedResult:
    token_ids: list[int]
    steps: list[str]
    step_scores: list[float] = field(default_factory=list)  # the winner's weighted-mean PRM reward per step, in [0, 1]
    finished: bool = False  # ended by end-of-sequence (not by a limit)
    policy_forward_tokens: int = 0  # tokens the policy processed (prefill + decode), for the benchmark


def _at_boundary(text: str, boundary: str) -> bool:
    if boundary == "blank_lines":
        return "\n\n" in text.lstrip("\n")
    if boundary == "sentences":  # a heuristic: "3." ends a step even if "5" was to follow
        return bool(_SENTENCE_END.search(text.strip()))
    return False  # turn: only the end of sequence ends a step


def combine(rewards: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """[K, n_objectives] PRM rewards on the common scale (`prm.to_rewards`) -> [K] weighted means;
    a NaN reward with a positive weight (cut by truncation) ranks last. An objective of weight 0 is
    not read."""
    w = torch.tensor(weights, dtype=rewards.dtype)
    if w.shape != rewards.shape[-1:] or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"prm_weights {list(weights)}: need {rewards.shape[-1]} finite, non-negative weights "
                         "(one per PRM objective, in its order), not all zero")
    used = w > 0
    s = (rewards[..., used] * w[used]).sum(-1) / w.sum()
    return torch.nan_to_num(s, nan=float("-inf"))


@torch.no_grad()
def guided_generate(policy, tokenizer, prm, prm_tokenizer, prompt: list[dict], *, weights, prm_weights: list[float],
                    candidates: int = 4, max_steps: int = 8, max_step_tokens: int = 64, max_new_tokens: int = 256,
                    boundary: str = "blank_lines", temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                    reencode: bool = False) -> GuidedResult:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary {boundary!r}: use one of {BOUNDARIES}")
    dev = policy.device
    merged, _ = policy.merge_rows(torch.as_tensor([weights], dtype=policy.heads.dtype, device=dev))
    run = lambda ids, **kw: policy(ids, head_ids=0, heads=merged, **kw)  # noqa: E731
    eos = eos_ids(tokenizer, policy.config)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(seed)
    res = GuidedResult(token_ids=[], steps=[])
    cache, last_logits = None, None

    def prefill(ids: list[int], rows: int = 1):
        c = DynamicCache()
        out = run(torch.tensor([ids] * rows, device=dev), past_key_values=c, use_cache=True, logits_to_keep=1)
        res.policy_forward_tokens += len(ids) * rows
        return c, out.logits[:, -1].float().cpu()

    prm_cache = None
    if not reencode:
        _check_tree_attention(policy.config)
        cache, last_logits = prefill(prompt_ids)
        if isinstance(getattr(prm, "backbone", None), torch.nn.Module):
            _check_tree_attention(prm.backbone.config)
            prm_cache = PRMPrefix(prm, prm_tokenizer, prompt)
    k = candidates
    while len(res.steps) < max_steps and len(res.token_ids) < max_new_tokens and not res.finished:
        if reencode:  # the baseline: the whole prefix encoded again, once per candidate
            cand, logits = prefill(prompt_ids + res.token_ids, rows=k)
            base_len = cand.get_seq_length()
        else:  # the candidates grow on the running cache itself, sharing its prefix
            tree = SharedPrefix(cache)
            logits = last_logits.repeat(k, 1)
        toks: list[list[int]] = [[] for _ in range(k)]
        done = [False] * k
        end_logits: list[torch.Tensor | None] = [None] * k
        budget = min(max_step_tokens, max_new_tokens - len(res.token_ids))
        for t in range(budget):
            nxt = sample(logits, temperature, top_p, gen)  # all K rows every time: the same draws in both modes
            newly = []
            for i in range(k):
                if done[i]:
                    continue
                toks[i].append(int(nxt[i]))
                if int(nxt[i]) in eos or _at_boundary(tokenizer.decode(toks[i]), boundary) or t + 1 == budget:
                    done[i] = True
                    newly.append(i)
            # fed: every candidate still running and each newly finished one's last token (its cache and the
            # next step's first logits), unless that token is the end of sequence
            feed = [i for i in range(k) if not done[i] or (i in newly and toks[i][-1] not in eos)]
            if not feed:
                break
            if reencode:  # every row, finished or not: the K-row batch of model.generate
                ids = torch.tensor([[toks[i][-1]] for i in range(k)], device=dev)
                pos = torch.tensor([[base_len + min(t, len(toks[i]) - 1)] for i in range(k)], device=dev)
                out = run(ids, past_key_values=cand, use_cache=True, position_ids=pos)
                res.policy_forward_tokens += k
                logits = out.logits[:, -1].float().cpu()
            else:
                pos, mask = tree.append(feed, dtype=policy.heads.dtype)
                out = run(torch.tensor([[toks[i][-1] for i in feed]], device=dev), attention_mask=mask,
                          past_key_values=cache, use_cache=True, position_ids=pos)
                res.policy_forward_tokens += len(feed)
                logits = logits.clone()
                logits[feed] = out.logits[0].float().cpu()
            for i in newly:
                end_logits[i] = logits[i]
            if all(done):
                break
        texts = [tokenizer.decode([x for x in tk if x not in eos]).strip() for tk in toks]
        raw = prm_cache.score(texts) if prm_cache else prm.score_last(prm_tokenizer, prompt, res.steps, texts)
        scores = combine(prm.to_rewards(raw), prm_weights)
        best = int(torch.argmax(scores))
        if prm_cache:
            prm_cache.accept(best)
        res.token_ids += toks[best]
        res.steps.append(texts[best])
        res.step_scores.append(float(scores[best]))
        if toks[best] and toks[best][-1] in eos:
            res.token_ids = res.token_ids[:-1]
            res.finished = True
            break
        if not reencode:
            tree.keep(best)  # the prefix + the winner's tokens, each fed exactly once
            last_logits = end_logits[best].unsqueeze(0)
    return res


class PRMPrefix:
    """The PRM's running KV cache: the prompt and the accepted steps, each followed by its separator,
    tokenized piece by piece exactly as `encode_steps` does. Candidates are scored in one forward
    of their own tokens (+ separator) on the shared prefix; `accept` keeps the winner's."""

    @torch.no_grad()
    def __init__(self, prm, tokenizer, prompt: list[dict]):
        self.prm, self.tok = prm, tokenizer
        self.dev = next(prm.parameters()).device
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        self.cache = DynamicCache()
        prm.backbone(input_ids=torch.tensor([ids], device=self.dev), past_key_values=self.cache, use_cache=True)
        self._tree = None

    @torch.no_grad()
    def score(self, candidates: list[str]) -> torch.Tensor:
        """[K, n_objectives]: each candidate's raw output as the next step (read at its separator; the
        same as `prm.score_last`, so `prm.to_rewards` maps it). Call `accept` before scoring the next
        step's candidates."""
        if self._tree is not None:
            raise RuntimeError("PRMPrefix.score called twice without accept()")
        pieces = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.prm.sep_id] for c in candidates]
        self._tree = SharedPrefix(self.cache)
        owners = [j for j, p in enumerate(pieces) for _ in p]
        pos, mask = self._tree.append(owners, dtype=self.prm.head.weight.dtype)
        ids = torch.tensor([[x for p in pieces for x in p]], device=self.dev)
        h = self.prm.backbone(input_ids=ids, attention_mask=mask, past_key_values=self.cache, position_ids=pos,
                              use_cache=True).last_hidden_state[0]
        last = torch.tensor([len(p) for p in pieces]).cumsum(0) - 1
        return self.prm.head(h[last.to(self.dev)].to(self.prm.head.weight.dtype)).float().cpu()

    def accept(self, best: int) -> None:
        self._tree.keep(best)
        self._tree = None


class SharedPrefix:
    """K candidates grown on one batch-1 cache: the prefix once, then every candidate's tokens in the
    order they are fed. `append` gives the position ids and the 4D additive mask under which each new
    token sees the prefix and its own candidate's earlier tokens (itself included) and nothing else,
    so each candidate computes what it would alone on prefix + its own tokens. `keep` drops the others."""

    def __init__(self, cache: DynamicCache):
        kinds = {type(layer).__name__ for layer in cache.layers} - {DynamicLayer.__name__}
        if kinds:  # sliding-window or offloaded layers drop or move tokens; the masks assume all are kept
            raise ValueError(f"guided decoding needs a full-attention cache; this model's has {sorted(kinds)} "
                             "layers: use reencode=True")
        self.cache, self.base = cache, cache.get_seq_length()
        self.owner = torch.empty(0, dtype=torch.long)  # the candidate of each cached token after the prefix

    def append(self, owners: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        new = torch.tensor(owners, dtype=torch.long)
        same = new[:, None] == new[None, :]
        causal = torch.ones(len(owners), len(owners), dtype=torch.bool).tril()
        earlier = self.owner[None, :] == new[:, None]  # this candidate's tokens already in the cache
        pos = self.base + earlier.sum(1) + (same & causal).sum(1) - 1
        see = torch.cat([torch.ones(len(owners), self.base, dtype=torch.bool), earlier, same & causal], 1)
        mask = torch.zeros(see.shape, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)
        self.owner = torch.cat([self.owner, new])
        dev = self.cache.layers[0].keys.device
        return pos.unsqueeze(0).to(dev), mask[None, None].to(dev)

    def keep(self, winner: int) -> None:
        idx = torch.cat([torch.arange(self.base), self.base + (self.owner == winner).nonzero().squeeze(1)])
        for layer in self.cache.layers:
            i = idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(-2, i), layer.values.index_select(-2, i)
        self.owner = torch.empty(0, dtype=torch.long)
        self.base = len(idx)


def _check_tree_attention(config) -> None:
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"guided decoding shares the prefix between candidates through a 4D attention mask, "
                         f"which attn_implementation {impl!r} does not take: load the model with 'sdpa' "
                         "(the default) or 'eager'")
