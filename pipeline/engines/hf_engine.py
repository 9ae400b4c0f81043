"""A transformers-backed generation engine behind the engine interface (pipeline.rollout).
For tests and small in-process measurements; batch work at scale uses the vLLM engine."""

from __future__ import annotations

import torch

from pipeline.models.checkpoint import load_causal_lm, load_tokenizer
from pipeline.models.tokenize import prompt_ids, prompt_text


class TransformersEngine:
    def __init__(self, model_dir: str, dtype: str = "auto", batch_size: int = 16, device: str | None = None):
        self.tok = load_tokenizer(model_dir)
        self.tok.padding_side = "left"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_dir, dtype).to(self.device).eval()
        self.batch_size, self.dtype = batch_size, dtype

    def reload_weights(self, checkpoint_dir: str) -> None:
        """New weights (same architecture), like VLLMEngine.reload_weights."""
        self.model = load_causal_lm(checkpoint_dir, self.dtype).to(self.device).eval()

    @property
    def tokenizer(self):
        return self.tok

    def eos_ids(self) -> set[int]:
        from pipeline.decoding.mixing import eos_ids

        return eos_ids(self.tok, self.model.config)

    @torch.no_grad()
    def sample_tokens(self, ids: list[list[int]], *, n: int = 1, max_tokens: int | list[int] = 256,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, seeds: list[int] | None = None,
                      stop: list[str] | None = None) -> list[list[list[int]]]:
        """As VLLMEngine.sample_tokens, one prompt at a time (its seed, its budget); `stop` is a hint only:
        samples run to their budget or end of sequence (the guided search cuts its steps itself)."""
        per = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ids)
        eos, out = self.eos_ids(), []
        for i, p in enumerate(ids):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            sample = temperature > 0
            x = torch.tensor([p], device=self.device)
            gen = self.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=per[i], do_sample=sample,
                num_return_sequences=n, temperature=temperature if sample else None,
                top_p=top_p if sample else None, top_k=(top_k if top_k > 0 else None) if sample else None,
                eos_token_id=sorted(eos), pad_token_id=self.tok.pad_token_id)
            rows = []
            for row in gen[:, len(p):].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))  # through the first end
                rows.append(row[:cut])
            out.append(rows)
        return out

    def render(self, prompt: list[dict]) -> str:
        return prompt_text(self.tok, prompt)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                 seeds: list[int] | None = None) -> list[list[str]]:
        texts = [self.render(p) for p in prompts]
        return self.complete(texts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop=stop, seeds=seeds)

    @torch.no_grad()
    def complete(self, texts: list[str], *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                 seeds: list[int] | None = None) -> list[list[str]]:
        """Continue raw text prompts. transformers samples a batch from one generator, so
        `seeds` only seeds the call (with its first entry), unlike the vLLM engine."""
        if seeds:
            seed = seeds[0]
        if seed is not None:
            torch.manual_seed(seed)
        out: list[list[str]] = []
        for i in range(0, len(texts), self.batch_size):
            # the ids training builds (prompt_ids), left-padded into one batch
            enc = self.tok.pad({"input_ids": [prompt_ids(self.tok, t) for t in texts[i : i + self.batch_size]]},
                               return_tensors="pt").to(self.device)
            sample = temperature > 0
            gen = self.model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=sample, num_return_sequences=n,
                temperature=temperature if sample else None, top_p=top_p if sample else None,
                top_k=(top_k if top_k > 0 else None) if sample else None,
                eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id,
            )
            new = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j in range(0, len(new), n):
                out.append([_cut(t, stop) for t in new[j : j + n]])
        return out


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text
