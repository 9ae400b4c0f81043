"""Reference log-probs, computed once by a Ray Data batch job and stored in the preference shards.

The reference of every MAH-DPO head is the SFT model, so one forward pass per
sequence with the SFT model gives `ref_chosen_logp` / `ref_rejected_logp`; the
trainer then holds no reference model. The tokenisation is the trainer's own
(`encode_pair` with the same max_length / max_prompt_length), recorded in
`_ref_logps.json` beside the shards so a trainer with other settings refuses them.
A pair encode_pair refuses (its prompt cannot fit max_prompt_length) gets null reference
log-probs and is counted in the log; the trainer refuses the same pair.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.models.tokenize import TOKENIZATION, encode_pair

log = logging.getLogger(__name__)


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
    def logps(self, rows: list[dict]) -> tuple[list[float | None], list[float | None]]:
        """Summed completion log-probs of chosen and rejected; None for a refused pair."""
        from pipeline.models.collate import PairCollate
        from pipeline.models.logps import causal_lm_logps

        collate = PairCollate(self.tok.pad_token_id)
        enc = [encode_pair(self.tok, r["prompt"], r["chosen"], r["rejected"], self.max_length, self.max_prompt_length)
               for r in rows]
        ok = [i for i, e in enumerate(enc) if not e["refused"]]
        if len(ok) < len(rows):
            log.warning("reference log-probs: %d of %d pairs refused (prompt over max_prompt_length %d even without "
                        "its earliest turns), left null: %s", len(rows) - len(ok), len(rows), self.max_prompt_length,
                        [rows[i].get("id") for i, e in enumerate(enc) if e["refused"]][:5])
        chosen: list[float | None] = [None] * len(rows)
        rejected: list[float | None] = [None] * len(rows)
        for j in range(0, len(ok), self.mb):
            idx = ok[j: j + self.mb]
            b = collate({k: [[enc[i][k]] for i in idx] for k in ("chosen_ids", "chosen_labels", "rejected_ids",
                                                                   "rejected_labels")}
                        | {k: [[0]] * len(idx) for k in ("head", "objective_id")})
            lp = causal_lm_logps(self.model, b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                 b["labels"].to(self.device)).cpu().tolist()
            for n, i in enumerate(idx):
                chosen[i], rejected[i] = lp[n], lp[len(idx) + n]
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
         "dtype": dtype, "tokenization": TOKENIZATION}, indent=1))
