"""Turning tokenised rows into padded tensors: SFT rows (PadCollate, or PackCollate: padding-free), preference pairs
(PairCollate: training and the cached reference log-probs), PRM examples (PRMCollate: training,
the linear probe, evaluation)."""

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
        # python ints, counted on the host: the harness logs them without a device sync
        out["num_tokens"] = (int(mask.sum()), int(mask.size))
        return out


class PackCollate:
    """Padding-free SFT: the micro-batch's rows concatenated into one row [1, sum(len)].
    `position_ids` restart at 0 per example and there is no `attention_mask`: transformers then
    finds the examples from the position ids (masking_utils.find_packed_sequence_indices) and
    masks attention block-diagonally (sdpa/eager), or runs varlen attention (flash attention).
    Each example's first label is -100, so no example learns to predict its first token from the
    previous example's last. `num_tokens` is (real, padded) = (total, total): nothing is padding."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if len(x) != len(y):
                raise ValueError(f"PackCollate: row {i} has {len(x)} input_ids but {len(y)} labels")
            if not len(x):
                raise ValueError(f"PackCollate: row {i} is empty")
        lab = [np.asarray(y, dtype=np.int64).copy() for y in labels]
        for y in lab:
            y[0] = IGNORE
        total = sum(len(x) for x in ids)
        return {"input_ids": torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))[None],
                "labels": torch.from_numpy(np.concatenate(lab))[None],
                "position_ids": torch.from_numpy(np.concatenate([np.arange(len(x), dtype=np.int64) for x in ids]))[None],
                "num_tokens": (total, total)}


class PairCollate:
    """Flattens groups into [chosen..., rejected...] rows, right-padded."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        flat = lambda k: [x for g in batch[k] for x in g]  # noqa: E731
        seqs = flat("chosen_ids") + flat("rejected_ids")
        labs = flat("chosen_labels") + flat("rejected_labels")
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(seqs), width), IGNORE, dtype=np.int64)
        att = np.zeros((len(seqs), width), dtype=np.int64)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            ids[i, : len(s)], labels[i, : len(s)], att[i, : len(s)] = s, lab, 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(att),
                "head": torch.tensor(flat("head"), dtype=torch.long),
                "objective_id": torch.tensor(flat("objective_id"), dtype=torch.long),
                # per-pair values, NaN where absent: reference log-probs not cached, plain DPO (not MODPO)
                **{k: torch.tensor(flat(k) if k in batch else [float("nan")] * (len(seqs) // 2), dtype=torch.float32)
                   for k in ("ref_chosen", "ref_rejected", "modpo_scale", "modpo_margin")}}


class PRMCollate:
    """Pads PRM rows: one response each, or prompt groups (rows with `n_responses`: lists of
    responses, flattened here, each response keeping its group's `prompt_hash`).
    packed: the responses are joined into one row [1, sum(len)] with `position_ids` restarting per
    response and no attention mask (as PackCollate; transformers builds the block-diagonal mask), and
    `positions` index that row (each response's SEP positions plus its offset): no compute on padding."""

    def __init__(self, pad_id: int, n_objectives: int, packed: bool = False):
        self.pad_id, self.n, self.packed = pad_id, n_objectives, packed

    @staticmethod
    def flatten(batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = {k: [x for g in batch[k] for x in g] for k in ("input_ids", "positions", "labels")}
        out["prompt_hash"] = [h for h, n in zip(batch["prompt_hash"], batch["n_responses"]) for _ in range(int(n))]
        for k in ("input_ids", "positions", "labels"):
            if len(out[k]) != len(out["prompt_hash"]):
                raise ValueError(f"PRMCollate: column {k!r} holds {len(out[k])} responses, n_responses says "
                                 f"{len(out['prompt_hash'])}")
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if "n_responses" in batch:
            batch = self.flatten(batch)
        ids, pos = batch["input_ids"], batch["positions"]
        width, steps = max(len(x) for x in ids), max(1, max(len(p) for p in pos))
        b = len(ids)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        att = torch.zeros((b, width), dtype=torch.long)
        positions = torch.zeros((b, steps), dtype=torch.long)
        step_mask = torch.zeros((b, steps))
        labels = torch.full((b, steps, self.n), float("nan"))
        for i in range(b):
            input_ids[i, : len(ids[i])] = torch.as_tensor(np.array(ids[i]))
            att[i, : len(ids[i])] = 1
            k = len(pos[i])
            positions[i, :k] = torch.as_tensor(np.array(pos[i]))
            step_mask[i, :k] = 1
            if k:
                labels[i, :k] = torch.as_tensor(np.asarray(batch["labels"][i], dtype=np.float32)).view(k, self.n)
        out = {"input_ids": input_ids, "attention_mask": att, "positions": positions, "step_mask": step_mask,
               "labels": labels, "prompt_hash": torch.as_tensor(np.asarray(batch["prompt_hash"], dtype=np.int64)),
               "num_tokens": (int(att.sum()), att.numel())}
        return self._pack(out, [len(x) for x in ids]) if self.packed else out

    @staticmethod
    def _pack(out: dict, lengths: list[int]) -> dict:
        starts = np.cumsum([0, *lengths[:-1]])
        keep = out["attention_mask"].bool()
        out["input_ids"] = out["input_ids"][keep][None]
        out["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
        # a padding step's position stays 0 (masked by step_mask, as in the padded layout)
        out["positions"] = (out["positions"] + torch.as_tensor(starts)[:, None]) * out["step_mask"].long()
        del out["attention_mask"]
        total = sum(lengths)
        out["num_tokens"] = (total, total)
        return out
