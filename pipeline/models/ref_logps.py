"""Reference log-probs, computed once by a Ray Data batch job and stored in the preference shards.

The reference of every MAH-DPO head is the SFT model, so one forward pass per
sequence with the SFT model gives `ref_chosen_logp` / `ref_rejected_logp`; the
trainer then holds no reference model. The tokenisation is the trainer's own
(`encode_pair` with the same max_length / max_prompt_length), recorded in
`_ref_logps.json` beside the shards so a trainer with other settings refuses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.models.tokenize import encode_pair


class RefLogps:
    """`ds.map_batches(RefLogps, fn_constructor_kwargs={...}, batch_format="pyarrow", concurrency=n)`."""

    def __init__(self, model_dir: str, max_length: int, max_prompt_length: int, dtype: str = "float32",
                 micro_batch_size: int = 8, device: str | None = None):
        from pipeline.models.checkpoint import load_tokenizer
        from pipeline.models.multihead import load_checked

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_checked(model_dir, dtype).to(self.device).eval()
        self.tok = load_tokenizer(model_dir)
        self.max_length, self.max_prompt_length, self.mb = max_length, max_prompt_length, micro_batch_size

    @torch.no_grad()
    def logps(self, rows: list[dict]) -> tuple[list[float], list[float]]:
        from pipeline.models.collate import PairCollate
        from pipeline.models.logps import causal_lm_logps

        collate = PairCollate(self.tok.pad_token_id)
        chosen, rejected = [], []
        for i in range(0, len(rows), self.mb):
            enc = [encode_pair(self.tok, r["prompt"], r["chosen"], r["rejected"], self.max_length, self.max_prompt_length)
                   for r in rows[i: i + self.mb]]
            b = collate({k: [[e[k]] for e in enc] for k in enc[0] if k != "truncated"}
                        | {k: [[0]] * len(enc) for k in ("head", "objective_id")})
            lp = causal_lm_logps(self.model, b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                 b["labels"].to(self.device)).cpu().tolist()
            chosen += lp[: len(enc)]
            rejected += lp[len(enc):]
        return chosen, rejected

    def __call__(self, batch: pa.Table) -> pa.Table:
        c, r = self.logps(batch.to_pylist())
        for name, vals in (("ref_chosen_logp", c), ("ref_rejected_logp", r)):
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, pa.array(vals, pa.float64()))
        return batch


def write_meta(out_dir: str | Path, model_dir: str, max_length: int, max_prompt_length: int, dtype: str) -> None:
    Path(out_dir, "_ref_logps.json").write_text(json.dumps(
        {"model": str(Path(model_dir).resolve()), "max_length": max_length, "max_prompt_length": max_prompt_length,
         "dtype": dtype}, indent=1))
