"""The one training harness: Ray Train (TorchTrainer) + DeepSpeed ZeRO.

A trainer (SFT, PRM, MAH-DPO) describes itself with a TrainSpec: how to build the
model, collate a micro-batch, compute the loss, and export the result. The
harness does the rest, the same way on a laptop (gloo, CPU) and on a GPU cluster
(NCCL, `use_gpu: true`): no branch on the device anywhere.

    worker:  build model -> AdamW -> deepspeed.initialize -> resume from the latest
             Ray Train checkpoint -> micro-batches from the worker's Ray Data shard
             -> backward / step (DeepSpeed accumulates) -> every N steps: eval,
             DeepSpeed checkpoint reported through ray.train.report -> export.

Resume: Ray Train V2 finds the run's latest checkpoint in `storage_path/<run_name>`
when the same run is launched again (or a worker fails, up to `max_failures`);
model, optimizer, scheduler and the step counter come back, and the harness skips
the micro-batches of the interrupted epoch that were already consumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline import progress
from pipeline.config import TrainConfig
from pipeline.train.ds_config import deepspeed_config

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class TrainSpec:
    """What a trainer plugs into the harness. Use top-level functions / picklable objects."""

    build_model: Callable[[], torch.nn.Module]
    collate: Callable[[dict[str, np.ndarray]], Batch]
    # (model, batch) -> (loss, metrics). Metrics are averaged over micro-batches and workers.
    loss: Callable[[Any, Batch], tuple[torch.Tensor, dict[str, Any]]]
    # (module, full state dict, out_dir) on rank 0 at the end; None: no export.
    export: Callable[[torch.nn.Module, dict, str], None] | None = None
    # (model, eval shard, micro_batch_size) -> metrics, on every worker (they must agree); None:
    # the loss's metrics averaged over batches and workers.
    evaluate: Callable[[Any, Any, int], dict[str, float]] | None = None
    params: dict = field(default_factory=dict)  # logged to the tracker
    # Name prefixes of parameters created from scratch (not loaded); they train at cfg.fresh_lr.
    fresh_params: tuple[str, ...] = ()
    # {last component of a parameter's name: lr}: loaded parameters the trainer trains at a rate of their own
    # (MAH-DPO's heads at dpo.head_lr: "heads" matches `heads` and a soup's `members.0.heads`)
    named_lrs: dict[str, float] = field(default_factory=dict)
    # (device) -> None, on every worker after deepspeed.initialize, inside whole_models(): loads what the
    # loss needs besides the trained model (the MAH-DPO reference), the same way on every rank.
    setup: Callable[[Any], None] | None = None


@contextlib.contextmanager
def whole_models():
    """Models built inside are whole, unpartitioned ones, even in a ZeRO-3 training loop.

    While an HfDeepSpeedConfig with stage 3 is alive, transformers' from_pretrained builds every model
    under deepspeed.zero.Init: partitioned across the ranks, with empty local weights that only the
    DeepSpeed engine's hooks gather. A frozen model outside the engine (a reference) must not be one:
    its forward fails ('weight' must be 2-D), and an engine around it would run collectives that only
    ranks with work for it join. The config is unset while inside and restored after."""
    from transformers.integrations import deepspeed as hf_ds

    live = hf_ds._hf_deepspeed_config_weak_ref  # the only handle transformers keeps on the live config
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        obj = live() if live is not None else None
        if obj is not None:
            hf_ds.set_hf_deepspeed_config(obj)


def check_whole(model: torch.nn.Module, what: str) -> None:
    """Refuses a ZeRO-3 partitioned model where a whole one is needed (DeepSpeed tags partitioned
    parameters with ds_id)."""
    parted = [n for n, p in model.named_parameters() if hasattr(p, "ds_id")]
    if parted:
        raise RuntimeError(f"{what}: {len(parted)} parameters are ZeRO-3 partitioned (e.g. {parted[0]}); "
                           "build it inside pipeline.train.harness.whole_models()")


@dataclass
class FitResult:
    step: int
    metrics: dict
    checkpoint: str | None
    export_dir: str | None
    log_dir: str
    best_dir: str | None = None  # <export_dir>_best, when best_metric kept one (its step: <log_dir>/best.json)


def _identity(spec: TrainSpec) -> dict:
    """What a checkpoint must match to be resumed: the model and what shapes it (not lr or steps)."""
    ident = {k: spec.params[k] for k in ("model", "method", "heads", "objectives", "kinds") if k in spec.params}
    if spec.params.get("head_rank"):  # only when set: checkpoints from before it existed had full heads
        ident["head_rank"] = spec.params["head_rank"]
    return json.loads(json.dumps(ident))


def param_groups(model: torch.nn.Module, cfg: TrainConfig, fresh: tuple[str, ...],
                 named_lrs: dict[str, float] | None = None) -> list[dict]:
    """Optimizer groups: parameters named with a `fresh` prefix train at cfg.fresh_lr (when set); those whose
    name ends in a key of `named_lrs` at that key's lr; the rest at cfg.lr (the optimizer's default)."""
    named_lrs = named_lrs or {}
    groups: dict[float | None, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = n.rsplit(".", 1)[-1]
        lr = named_lrs[leaf] if leaf in named_lrs else cfg.fresh_lr if cfg.fresh_lr and n.startswith(fresh) else None
        groups.setdefault(lr, []).append(p)
    out = [{"params": groups.pop(None, [])}]
    return out + [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def plan_steps(num_rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `num_rows` rows split over the workers."""
    micro_per_worker = (num_rows // cfg.num_workers) // cfg.micro_batch_size
    per_epoch = micro_per_worker // cfg.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"{num_rows} training rows are too few for one optimizer step: need at least "
            f"num_workers*micro_batch_size*grad_accum = {cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum}"
        )
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' schedules (the ones its Trainer uses): linear warmup from 0 over
    `warmup_steps` (lr = lr * step / warmup_steps, so step 0 runs at lr 0), then constant,
    linear decay to 0 or cosine decay to 0 at `total_steps`."""
    from transformers import get_scheduler

    # transformers' "constant" ignores warmup; its warmup variant has another name
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def _mean_across_workers(metrics: dict[str, float], device) -> dict[str, float]:
    """Mean of each metric over the workers that have it. Workers may hold different keys (a
    PRM micro-batch without labels of one objective), so the key sets are agreed first: every
    rank must run the same collectives."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    key_sets = [None] * dist.get_world_size()
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted(set().union(*key_sets))
    if not keys:
        return {}
    t = torch.tensor([metrics.get(k, 0.0) for k in keys] + [float(k in metrics) for k in keys],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t)
    sums, counts = t[: len(keys)].tolist(), t[len(keys):].tolist()
    return {k: v / c for k, v, c in zip(keys, sums, counts) if c > 0}


class _Averager:
    """Per-key mean over the micro-batches that reported the key. Tensor metrics are summed on their
    device and read once per logged step, not per micro-batch: `.item()` waits for the device to
    finish, which on a GPU stalls the next micro-batch's launch."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            v = v.detach().float().sum() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


def _say(msg: str) -> None:
    # sys.stdout directly: Ray Train V2 patches print() to log *and* echo, doubling every line.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _count_tokens(batch: Batch) -> tuple[int, int]:
    """(real, padded) tokens of a collated micro-batch: the collate's own `num_tokens` (a packed batch
    has no attention mask; the key is removed here, the loss never sees it), else the attention mask."""
    if "num_tokens" in batch:
        real, padded = batch.pop("num_tokens")
        return int(real), int(padded)
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
    return 0, 0


def _to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _evaluate(engine, spec: TrainSpec, shard, cfg: TrainConfig) -> dict[str, float]:
    engine.eval()
    if spec.evaluate is not None:
        with torch.no_grad():
            metrics = spec.evaluate(engine, shard, cfg.micro_batch_size)
        engine.train()
        return {f"eval/{k}": v for k, v in metrics.items()}
    avg = _Averager()
    with torch.no_grad():
        for np_batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy", drop_last=False):
            batch = spec.collate(np_batch)
            _count_tokens(batch)  # drops the collate's token counts
            loss, metrics = spec.loss(engine, _to_device(batch, engine.device))
            avg.add({"loss": loss, **metrics})
    engine.train()
    return {f"eval/{k}": v for k, v in _mean_across_workers(avg.mean(), engine.device).items()}


def _train_loop(config: dict) -> None:
    marks = {"worker_start": time.time()}  # start-up, phase by phase (timings.json)
    import deepspeed
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    from pipeline.train.tracking import Tracker

    spec: TrainSpec = config["spec"]
    cfg = TrainConfig.model_validate(config["train"])
    total_steps, steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    ds_cfg = deepspeed_config(cfg, world)
    # Ray Train already set up torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed adopts it.
    deepspeed.init_distributed(verbose=False)
    hf_ds = None
    if cfg.zero_stage == 3:
        # Lets transformers' from_pretrained build the model partitioned (zero.Init):
        # a 7B model never sits whole on one GPU.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (must stay alive while the model is built)
    marks["distributed_ready"] = time.time()  # imports, DeepSpeed adopting the process group
    model = spec.build_model()
    marks["model_built"] = time.time()
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    # fused: one pass over each tensor instead of ~6 (CPU: 0.33 -> 0.11 s per step for SmolLM2;
    # transformers' Trainer default too)
    optimizer = torch.optim.AdamW(param_groups(model, cfg, spec.fresh_params, spec.named_lrs), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_cfg)
    marks["deepspeed_ready"] = time.time()
    if spec.setup is not None:  # every rank, here, so no rank starts a step (and its collectives) late
        with whole_models():
            spec.setup(engine.device)
    marks["setup_done"] = time.time()

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    ckpt = ray.train.get_checkpoint()
    run_dir = None if "://" in config["storage"] else Path(config["storage"], config["run_name"])
    late = newest_reported_checkpoint(run_dir) if run_dir else None
    if late is not None and (ckpt is None or _ckpt_step(late) > _ckpt_step(ckpt.path)):
        if rank == 0:  # written and uploaded by every rank, but the controller had not registered it yet
            _say(f"[train] {late} is newer than Ray Train's last registered checkpoint "
                 f"({ckpt.path if ckpt else 'none'}): resuming from it")
        ckpt = ray.train.Checkpoint.from_directory(str(late))
    if ckpt:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "trainer_state.json").read_text())
            theirs = state.get("identity")
            if theirs is not None and theirs != _identity(spec):  # not this run's: its weights would not fit
                diff = {k: (theirs.get(k), v) for k, v in _identity(spec).items() if theirs.get(k) != v}
                raise RuntimeError(f"{ckpt.path}: a checkpoint of another run under run_name {config['run_name']!r} "
                                   f"(checkpoint vs this run: {diff}); use another run_name or storage_path, or "
                                   "remove that run's directory to start over")
            engine.load_checkpoint(d, tag="ds")
        if rank == 0:
            _say(f"[train] resumed from {ckpt.path} at step {state['step']}")

    log_dir = config["log_dir"]
    if rank == 0:  # steps after the checkpoint are redone: their earlier lines go, so every step is logged once
        dropped = truncate_metrics(os.path.join(log_dir, "metrics.jsonl"), state["step"])
        if dropped:
            _say(f"[train] {dropped} metric line(s) after step {state['step']} removed: those steps are redone")
        truncate_metrics(os.path.join(log_dir, EVAL_METRICS), state["step"])
    tracker = Tracker(cfg.tracker, config["run_name"], os.path.join(log_dir, "tb"), spec.params,
                      resume_step=state["step"]) if rank == 0 else None
    metrics_file = open(os.path.join(log_dir, "metrics.jsonl"), "a") if rank == 0 else None
    # A live bar only on a terminal; in logs (CI, `ray job logs`) the per-step lines are the progress.
    bar = tqdm(total=total_steps, desc=config["run_name"], position=0) if rank == 0 and config["progress_bar"] else None
    if bar:
        bar.update(state["step"])

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config["has_eval"] else None
    step, last_metrics = state["step"], {}
    avg, t0 = _Averager(), time.time()
    # Wall-clock marks for start-up and export cost (rank 0 writes <log_dir>/timings.json at the end)
    # and token counts per logged step: real (attention mask) and padded, summed over the workers.
    timings = {"launch": config.get("launch_time"), **marks, "loop_start": t0}
    tokens = {"tokens": 0, "tokens_padded": 0}

    best = {"value": None}

    def export(out_dir: str) -> None:
        # Every rank takes part in gathering ZeRO-3 partitions; rank 0 writes.
        sd = engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3 else engine.module.state_dict()
        if rank == 0:
            spec.export(engine.module, sd, out_dir)
            _say(f"[train] exported to {out_dir}")

    def evaluate(metrics: dict) -> None:
        """Held-out metrics into `metrics` (logged to eval_metrics.jsonl); the best model kept."""
        ev = _evaluate(engine, spec, eval_shard, cfg)
        metrics.update(ev)
        if rank == 0:
            with open(Path(log_dir, EVAL_METRICS), "a") as f:
                f.write(json.dumps({"step": step, **ev}) + "\n")
            tracker.log(ev, step)
        v = metrics.get(cfg.best_metric) if cfg.best_metric else None
        if v is not None and config["export_dir"] and spec.export is not None and math.isfinite(v) and (
                best["value"] is None or (v < best["value"] if cfg.best_mode == "min" else v > best["value"])):
            best["value"] = v
            export(config["export_dir"] + "_best")
            if rank == 0:
                Path(log_dir, BEST).write_text(json.dumps({"step": step, "metric": cfg.best_metric, "value": v}))

    def save_and_report(metrics: dict, micro_in_epoch: int, epoch: int, checkpoint: bool = True) -> None:
        if eval_shard is not None:
            evaluate(metrics)
        if rank == 0:  # the last report's metrics for fit(): Ray Train's Result keeps only a checkpoint's
            Path(log_dir, FINAL_METRICS).write_text(json.dumps(metrics))
        if not checkpoint:  # the end of a fit whose export is its result (checkpoint_at_end: false)
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds")
            if rank == 0:
                Path(d, "trainer_state.json").write_text(
                    json.dumps({"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                                "identity": _identity(spec)}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint-{step:07d}")
        if run_dir is not None and (run_dir / f"checkpoint-{step:07d}").is_dir():
            # report() returns once this rank's files are uploaded (SYNC): say so, for a resume that
            # starts before the controller registers the checkpoint (it polls every ~2 s)
            (run_dir / f"checkpoint-{step:07d}" / f"{REPORTED}{rank}").write_text(str(world))

    done = step >= total_steps
    epoch = state["epoch"]
    while not done and epoch < cfg.epochs:
        skip = state["micro_in_epoch"] if epoch == state["epoch"] else 0
        micro = 0
        it = train_shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=cfg.micro_batch_size * 16,
                                      local_shuffle_seed=cfg.seed + epoch)
        for np_batch in it:
            micro += 1
            timings.setdefault("first_batch", time.time())
            if micro <= skip:
                continue
            batch = spec.collate(np_batch)
            real, padded = _count_tokens(batch)  # on the host batch: no device sync
            tokens["tokens"] += real
            tokens["tokens_padded"] += padded
            loss, metrics = spec.loss(engine, _to_device(batch, engine.device))
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            avg.add({"loss": loss, **metrics})
            if not boundary:
                continue
            step += 1
            done = step >= total_steps
            if rank == 0:  # the main job's console bar (a no-op outside it)
                progress.report(f"{config['run_name']} steps", step, total_steps)
            if step % cfg.log_every == 0 or done:
                m = _mean_across_workers({**avg.mean(), **tokens}, engine.device)
                for k in tokens:  # per optimizer step, summed over workers
                    m[k] *= world / cfg.log_every
                lrs = scheduler.get_last_lr()  # per optimizer group: the default first, then fresh / named ones
                m.update({f"lr_group{i}": v for i, v in enumerate(lrs[1:], 1)})
                m.update(lr=lrs[0], epoch=epoch + micro / max(1, steps_per_epoch * cfg.grad_accum),
                         step_time_s=(time.time() - t0) / cfg.log_every)
                last_metrics = m
                if rank == 0:
                    _say(f"[train] step {step}/{total_steps} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()))
                    metrics_file.write(json.dumps({"step": step, **m}) + "\n")
                    metrics_file.flush()
                    tracker.log(m, step)
                avg, t0 = _Averager(), time.time()
                tokens = dict.fromkeys(tokens, 0)
                timings.setdefault("first_step_end", t0)
                timings["last_step_end"] = t0
            if bar:
                bar.update(1)
            if step in cfg.export_steps and not done and config["export_dir"] and spec.export is not None:
                export(f"{config['export_dir']}_step{step}")
            reporting = step % cfg.checkpoint_every == 0 or done  # save_and_report evaluates too
            if cfg.eval_every and step % cfg.eval_every == 0 and eval_shard is not None and not reporting:
                evaluate({})
            if reporting:
                save_and_report({"step": step, **last_metrics}, micro, epoch,
                                checkpoint=step % cfg.checkpoint_every == 0 or cfg.checkpoint_at_end)
            if done:
                break
        if not done:
            epoch += 1
    if step == state["step"] and ckpt is None:
        raise RuntimeError("no optimizer step ran: the data shard was empty")

    if config["export_dir"] and spec.export is not None:
        timings["export_start"] = time.time()
        export(config["export_dir"])
        timings["export_end"] = time.time()
    if bar:
        bar.close()
    if rank == 0:
        tracker.close()
        metrics_file.close()
        Path(log_dir, "timings.json").write_text(json.dumps(timings))


FINAL_METRICS = "final_metrics.json"  # in log_dir: the last reported metrics of a fit
EVAL_METRICS = "eval_metrics.jsonl"  # in log_dir: {"step", "eval/...": ...} per held-out evaluation
BEST = "best.json"  # in log_dir: {"step", "metric", "value"} of the model kept in <export_dir>_best


def fit(spec: TrainSpec, cfg: TrainConfig, datasets: dict, *, run_name: str, num_train_rows: int,
        log_dir: str, export_dir: str | None = None) -> FitResult:
    """Run the harness on Ray Train. `datasets["train"]` (and optional "eval") are Ray Datasets."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.tracking import check_tracker

    check_tracker(cfg.tracker)
    steps_per_epoch, total_steps = plan_steps(num_train_rows, cfg)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    resources = cfg.resources_per_worker or ({"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 1})
    log.info("training %s: %d steps (%d per epoch), %d workers, ZeRO-%d", run_name, total_steps,
             steps_per_epoch, cfg.num_workers, cfg.zero_stage)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "spec": spec, "train": cfg.model_dump(), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "run_name": run_name, "log_dir": str(Path(log_dir).resolve()), "has_eval": "eval" in datasets,
            "storage": storage,
            "export_dir": str(Path(export_dir).resolve()) if export_dir else None,
            "progress_bar": sys.stderr.isatty(), "launch_time": time.time(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    final = Path(log_dir) / FINAL_METRICS
    for f in (final, Path(log_dir) / BEST):
        f.unlink(missing_ok=True)  # an earlier fit's, in the same log_dir
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    # the last report's metrics (rank 0 wrote them): Result.metrics holds only the last checkpoint's, and
    # a fit with checkpoint_at_end false may end with no checkpoint at all
    metrics = json.loads(final.read_text()) if final.exists() else (result.metrics or {})
    best = f"{export_dir}_best" if export_dir and (Path(log_dir) / BEST).exists() else None
    return FitResult(step=metrics.get("step", total_steps), metrics=metrics,
                     checkpoint=ckpt.path if ckpt else None, export_dir=export_dir, log_dir=log_dir, best_dir=best)


REPORTED = ".reported-rank"  # + rank: that rank's checkpoint files are fully uploaded


def _ckpt_step(path) -> int:
    """The step in a checkpoint directory's name (checkpoint-0000012), -1 for any other name."""
    m = re.fullmatch(r"checkpoint-(\d+)", Path(str(path)).name)
    return int(m.group(1)) if m else -1


def newest_reported_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-* under a local run directory that every rank of the run that wrote it has
    marked uploaded (its markers hold the world size), or None."""
    dirs = [d for d in run_dir.glob("checkpoint-*") if _ckpt_step(d) >= 0] if run_dir.is_dir() else []
    for d in sorted(dirs, key=_ckpt_step, reverse=True):
        marks = list(d.glob(REPORTED + "*"))
        if marks and (d / "trainer_state.json").exists():
            world = int(marks[0].read_text() or 0)
            if all((d / f"{REPORTED}{r}").exists() for r in range(world)):
                return d
    return None


def truncate_metrics(path: str, step: int) -> int:
    """Drop the lines of steps after `step` (a resume redoes them; a checkpoint written just before a failure
    may not be the one Ray Train resumes from), atomically; -> the number dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    lines = p.read_text().splitlines()
    keep = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(keep) < len(lines):
        tmp = p.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, p)
    return len(lines) - len(keep)


def read_metrics(log_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    """Per-step metrics the harness logged (the last entry wins for a step logged twice); name EVAL_METRICS:
    the held-out evaluations."""
    p = Path(log_dir) / name
    rows = {}
    for line in p.read_text().splitlines() if p.exists() else []:
        r = json.loads(line)
        rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]
