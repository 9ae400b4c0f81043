"""The DeepSpeed config the harness hands to `deepspeed.initialize`.

The optimizer is a torch one passed in code (a DeepSpeed-named optimizer
JIT-compiles a C++ op, ~50 s on CPU), so no "optimizer" block here.
"""

from __future__ import annotations

import copy

from pipeline.config import TrainConfig
from pipeline.models.precision import resolve_bf16


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Needed to export one consolidated 16-bit state dict at the end.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=cfg.use_gpu, contiguous_gradients=True)
    base = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        # resolved here, in the worker: "auto" follows the worker's device (pipeline.models.precision)
        "bf16": {"enabled": resolve_bf16(cfg.bf16)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the harness logs; DeepSpeed's own prints only add noise
        "wall_clock_breakdown": False,
    }
    return _merge(base, cfg.deepspeed)
