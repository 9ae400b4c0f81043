"""Turning tokenised rows into padded tensors (shared by the trainers)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.tokenize import IGNORE


class PadCollate:
    """Right-pads `input_ids` (with `pad_id`) and `labels` (with -100) to the longest row
    of the micro-batch, and builds the attention mask. Other numeric columns pass through."""

    def __init__(self, pad_id: int, keys_to_pad: tuple[str, ...] = ("input_ids", "labels")):
        self.pad_id, self.keys = pad_id, keys_to_pad

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        width = max(len(x) for x in ids)
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key not in batch:
                continue
            fill = self.pad_id if key == "input_ids" else IGNORE
            arr = np.full((len(ids), width), fill, dtype=np.int64)
            for i, row in enumerate(batch[key]):
                arr[i, : len(row)] = row
            out[key] = torch.from_numpy(arr)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            mask[i, : len(row)] = 1
        out["attention_mask"] = torch.from_numpy(mask)
        return out
