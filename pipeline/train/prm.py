"""Training the vectorized PRM on stepwise shards, through the shared harness.

Rows of one response (same prompt and steps) for different objectives merge into
one example with a label vector per step, so one forward pass trains every
objective that response has labels for; a missing label is NaN and masked. The
loss follows each objective's label kind (pipeline.train.prm_losses), weighted
per objective.

A training row is a prompt group: the responses of one prompt that carry an outcome
(Bradley-Terry) label travel together, so a shuffled micro-batch holds every pair of
their prompt (pairs form only within a micro-batch); every other response is a group
of one, so soft and hard objectives train as before. `micro_batch_size` counts groups.
"""

from __future__ import annotations

import functools
import logging
import json
from pathlib import Path
import math
import random

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.hashing import stable_hash
from pipeline.models.collate import PRMCollate
from pipeline.models.prm import DEFAULT_SEPARATOR, VectorPRM, build_prm, encode_steps
from pipeline.train.prm_losses import bradley_terry, combine, masked_step_losses, outcome_pairs
from pipeline.train.harness import FitResult, TrainSpec

log = logging.getLogger(__name__)


def merge_stepwise(rows: list[dict], objectives: list[str], stats: dict | None = None) -> list[dict]:
    """One example per (prompt, steps), with labels [steps][objectives] (None where missing).

    Two rows of one objective for the same (prompt, steps) (two trajectories sampled alike) are
    duplicates: their labels are averaged per step (more rollouts of the same prefixes), and
    counted in `stats["duplicate_rows"]`."""
    index = {o: j for j, o in enumerate(objectives)}
    out: dict[str, dict] = {}
    seen: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["objective"] not in index:
            raise ValueError(f"row {r['id']}: objective {r['objective']!r} is not one of the PRM's {objectives}")
        key = json.dumps([r["prompt"], r["completions"]])
        ex = out.setdefault(key, {"prompt": r["prompt"], "completions": r["completions"],
                                  "labels": [[None] * len(objectives) for _ in r["completions"]],
                                  "prompt_key": json.dumps(r["prompt"])})
        j = index[r["objective"]]
        seen[key, j] = seen.get((key, j), 0) + 1
        counts = ex.setdefault("_n", {})
        for t, x in enumerate(r["labels"]):
            if x is None:
                continue
            n = counts[t, j] = counts.get((t, j), 0) + 1  # a running mean over the rows that label step t
            old = ex["labels"][t][j]
            ex["labels"][t][j] = x if n == 1 else old + (x - old) / n
    for ex in out.values():
        ex.pop("_n", None)
    if stats is not None:
        stats["duplicate_rows"] = sum(n - 1 for n in seen.values())
    return list(out.values())


def outcome_score(example: dict, j: int) -> float | None:
    """A response's outcome label for objective j: on its last step (pipeline.labeling: `outcome`
    labels the last step only), where prm_loss reads it."""
    return example["labels"][-1][j] if example["labels"] else None


def group_examples(examples: list[dict], kinds: list[str]) -> list[dict]:
    """Training rows {prompt, prompt_key, responses: [{completions, labels}]}: the responses of one
    prompt with an outcome label (any outcome objective) in one group, so Bradley-Terry sees all
    their pairs; every other response alone, in input order."""
    outcome = [j for j, k in enumerate(kinds) if k == "outcome"]
    groups: dict[str, dict] = {}
    out = []
    for e in examples:
        resp = {"completions": e["completions"], "labels": e["labels"]}
        if any(outcome_score(e, j) is not None for j in outcome):
            g = groups.get(e["prompt_key"])
            if g is None:
                g = groups[e["prompt_key"]] = {"prompt": e["prompt"], "prompt_key": e["prompt_key"], "responses": []}
                out.append(g)
            g["responses"].append(resp)
        else:
            out.append({"prompt": e["prompt"], "prompt_key": e["prompt_key"], "responses": [resp]})
    return out


def outcome_pair_counts(groups: list[dict], objectives: list[str], kinds: list[str]) -> dict[str, tuple[int, int]]:
    """Per outcome objective: (Bradley-Terry pairs, prompts with at least one) in grouped rows: every
    two responses of a prompt whose outcome labels differ. Counted before tokenisation: a response
    whose last step max_length cuts loses its pairs in training."""
    out = {}
    for j, (o, kind) in enumerate(zip(objectives, kinds)):
        if kind != "outcome":
            continue
        pairs = prompts = 0
        for g in groups:
            sc = [x for r in g["responses"] if (x := outcome_score(r, j)) is not None]
            n = sum(a > b for a in sc for b in sc)
            pairs, prompts = pairs + n, prompts + (n > 0)
        out[o] = (pairs, prompts)
    return out


def check_outcome_pairs(groups: list[dict], objectives: list[str], kinds: list[str]) -> dict[str, int]:
    """Logs the pairs of every outcome objective; refuses one with none (it would train on nothing)."""
    counts = outcome_pair_counts(groups, objectives, kinds)
    for o, (pairs, prompts) in counts.items():
        log.info("fit_prm: %s (outcome): %d pairs from %d prompts", o, pairs, prompts)
        if pairs == 0:
            raise ValueError(f"outcome objective {o!r} has no Bradley-Terry pair in the training data: no prompt has "
                             "two responses with different outcome labels; sample more responses per prompt, or "
                             "train it as a soft/hard objective (drop it from outcome_objectives)")
    return {o: pairs for o, (pairs, _) in counts.items()}


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, separator: str):
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.prm import add_separator

    tok = load_tokenizer(model_dir)
    return tok, add_separator(tok, separator)


def tokenize_prm(batch: pa.Table, model_dir: str, separator: str, max_length: int) -> pa.Table:
    """Token ids, SEP positions and flat label vectors of each row: one response (`completions`,
    `labels`), or a prompt group (`responses`, from group_examples: lists of those, + `n_responses`,
    which PRMCollate flattens)."""
    tok, sep = _tokenizer(model_dir, separator)
    rows = batch.to_pylist()
    # stable_hash, not hash(): str hashes are salted per process, and workers must agree
    hashes = pa.array([stable_hash(r["prompt_key"], 7) for r in rows], pa.int64())
    flat = lambda e: [x for row in e["labels"] for x in row]  # noqa: E731
    if "responses" not in batch.column_names:
        enc = [encode_steps(tok, r["prompt"], r["completions"], sep, max_length, r["labels"]) for r in rows]
        return pa.table({
            "input_ids": pa.array([e["input_ids"] for e in enc], pa.list_(pa.int32())),
            "positions": pa.array([e["positions"] for e in enc], pa.list_(pa.int32())),
            "labels": pa.array([flat(e) for e in enc], pa.list_(pa.float32())),
            "prompt_hash": hashes,
            "n_steps": pa.array([e["n_steps"] for e in enc], pa.int32()),
            "cut_steps": pa.array([e["n_steps"] - len(e["positions"]) for e in enc], pa.int32()),
        })
    enc = [[encode_steps(tok, r["prompt"], x["completions"], sep, max_length, x["labels"]) for x in r["responses"]]
           for r in rows]
    nested = lambda t: pa.list_(pa.list_(t))  # noqa: E731
    return pa.table({
        "input_ids": pa.array([[e["input_ids"] for e in g] for g in enc], nested(pa.int32())),
        "positions": pa.array([[e["positions"] for e in g] for g in enc], nested(pa.int32())),
        "labels": pa.array([[flat(e) for e in g] for g in enc], nested(pa.float32())),
        "prompt_hash": hashes,
        "n_responses": pa.array([len(g) for g in enc], pa.int32()),
        "n_steps": pa.array([sum(e["n_steps"] for e in g) for g in enc], pa.int32()),
        "cut_steps": pa.array([sum(e["n_steps"] - len(e["positions"]) for e in g) for g in enc], pa.int32()),
    })


def prm_loss(model, batch, objectives: list[str], kinds: list[str], weights: list[float]):
    pred = model(batch["input_ids"], batch.get("attention_mask"), batch["positions"], batch["step_mask"],
                 position_ids=batch.get("position_ids"))
    losses = masked_step_losses(pred, batch["labels"], kinds)
    n_steps = batch["step_mask"].sum(1).long()
    last = (n_steps - 1).clamp(min=0)
    for j, kind in enumerate(kinds):
        if kind != "outcome":
            continue
        rows = torch.arange(pred.shape[0], device=pred.device)
        scores = batch["labels"][rows, last, j].tolist()
        pairs = outcome_pairs(batch["prompt_hash"].tolist(), [None if math.isnan(s) else s for s in scores])
        if pairs:
            losses[j] = bradley_terry(pred[rows, last, j].float(), torch.tensor(pairs, device=pred.device))
    metrics = {f"loss/{objectives[j]}": v.detach() for j, v in losses.items()}
    if not losses:  # every step of this micro-batch was cut by max_length: a zero loss keeps ranks in step
        return pred.sum() * 0.0, metrics
    return combine(losses, weights), metrics


def export_prm(module: VectorPRM, state_dict: dict, out_dir: str, tokenizer_dir: str) -> None:
    tok, _ = _tokenizer(tokenizer_dir, module.separator)
    module.save(out_dir, tokenizer=tok, state_dict=state_dict)


def _build(model_dir, objectives, kinds, separator, head=None):
    return build_prm(model_dir, objectives, dict(zip(objectives, kinds)), separator, head=head)[0]


def label_priors(examples: list[dict], kinds: list[str]) -> list[float]:
    """Per objective (merged examples' label vectors), what a trivial baseline predicts: the mean
    soft label, the logit of the hard labels' positive rate, 0 for outcome scores (only their
    differences are trained)."""
    out = []
    for j, kind in enumerate(kinds):
        vals = [step[j] for e in examples for step in e["labels"] if step[j] is not None]
        mean = sum(vals) / len(vals) if vals else 0.5
        if kind == "hard":
            p = min(max(mean, 1e-3), 1 - 1e-3)
            out.append(math.log(p / (1 - p)))
        else:
            out.append(mean if kind == "soft" else 0.0)
    return out


def build_spec(model_dir: str, objectives: list[str], kinds: list[str], weights: list[float] | None = None,
               separator: str = DEFAULT_SEPARATOR, head: dict | None = None, padding_free: bool = False) -> TrainSpec:
    tok, _ = _tokenizer(model_dir, separator)
    return TrainSpec(
        build_model=functools.partial(_build, model_dir, objectives, kinds, separator, head),
        collate=PRMCollate(tok.pad_token_id, len(objectives), packed=padding_free),
        loss=functools.partial(prm_loss, objectives=objectives, kinds=kinds, weights=weights or [1.0] * len(objectives)),
        export=functools.partial(export_prm, tokenizer_dir=model_dir),
        params={"model": model_dir, "objectives": objectives, "kinds": kinds},
        fresh_params=("head.",),  # VectorPRM.head: one output per objective, not pretrained
    )


def prm_evaluate(model, shard, micro_batch_size: int, objectives: list[str], kinds: list[str], collate) -> dict:
    """Per-objective held-out metrics over the whole eval set (predictions gathered from every worker)."""
    import torch.distributed as dist

    from pipeline.train.prm_metrics import objective_metrics

    preds, labels, groups = [], [], []
    for np_batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", drop_last=False):
        b = collate(np_batch)
        dev = {k: v.to(model.device) for k, v in b.items() if torch.is_tensor(v)}  # not num_tokens
        out = model(dev["input_ids"], dev.get("attention_mask"), dev["positions"], dev["step_mask"],
                    position_ids=dev.get("position_ids"))
        mask = b["step_mask"] > 0
        preds.append(out.float().cpu()[mask].numpy())
        labels.append(b["labels"][mask].numpy())
        groups.append(b["prompt_hash"].unsqueeze(1).expand_as(b["step_mask"])[mask].numpy())
    local = [np.concatenate(x) if x else np.zeros((0, len(objectives))) for x in (preds, labels)]
    local.append(np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64))
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    p, y, g = (np.concatenate([part[i] for part in parts]) for i in range(3))
    out = {}
    for j, (name, kind) in enumerate(zip(objectives, kinds)):
        for k, v in objective_metrics(kind, p[:, j], y[:, j], g).items():
            out[f"{name}/{k}"] = float(v)
    return out


def run_fit_prm(cfg) -> FitResult:
    """Fit the vectorized PRM on stepwise shards (pipeline.config.PRMJobConfig)."""
    import ray

    from pipeline.data.io import read_records
    from pipeline.models.registry import resolve_model
    from pipeline.objectives.registry import resolve_keys, resolve_objective
    from pipeline.train.harness import fit

    model_dir = resolve_model(cfg.model.name_or_path)
    table, report = read_records(cfg.data.paths, "stepwise", defaults=cfg.data.defaults,
                                 skip_bad_rows=cfg.data.skip_bad_rows, quarantine_dir=cfg.data.quarantine_dir)
    rows = table.to_pylist()
    # config names are resolved against the data's objective ids (`math_word/accuracy`): a bare name
    # that ends exactly one id means it; one that ends two is an error naming both, never a merge
    in_data = sorted({r["objective"] for r in rows})
    objectives = [resolve_objective(o, in_data, f"objectives ({cfg.data.paths}):") for o in cfg.objectives] or in_data
    outcome = {resolve_objective(o, objectives, "outcome_objectives:") for o in cfg.outcome_objectives}
    loss_weights = resolve_keys(cfg.loss_weights, objectives, "loss_weights:")
    rows = [r for r in rows if r["objective"] in objectives] if cfg.objectives else rows
    kinds = []
    for o in objectives:
        seen = {r["label_kind"] for r in rows if r["objective"] == o}
        if not seen:
            raise ValueError(f"objective {o!r} has no rows in {cfg.data.paths}")
        if o in outcome:
            kinds.append("outcome")
        elif seen == {"hard", "soft"}:
            # an objective declared shared across families (shared_objectives: [accuracy]: math MC
            # values and tutoring judge votes): a 0/1 label is a valid soft target, so it trains on MSE
            log.warning("objective %r has soft and hard labels: all are trained as soft targets (MSE)", o)
            kinds.append("soft")
        elif len(seen) > 1:
            raise ValueError(f"objective {o!r} mixes label kinds {sorted(seen)}; label it one way")
        else:
            kinds.append(seen.pop())
    for o, kind in zip(objectives, kinds):  # a PRM cannot rank what its labels never show
        vals = [x for r in rows if r["objective"] == o for x in r["labels"] if x is not None]
        pos = sum(x >= 0.5 for x in vals)
        log.info("fit_prm: %s (%s): %d labelled steps, %d at or above 0.5", o, kind, len(vals), pos)
        if kind != "outcome" and (pos < 5 or len(vals) - pos < 5):
            log.warning("fit_prm: objective %r has %d labels >= 0.5 and %d below: too one-sided to learn a ranking; "
                        "label more (or stronger) trajectories", o, pos, len(vals) - pos)
    stats: dict = {}
    examples = merge_stepwise(rows, objectives, stats)
    if stats["duplicate_rows"]:
        log.warning("fit_prm: %d stepwise rows repeat an (objective, prompt, steps) of another row: their labels "
                    "are averaged into one example", stats["duplicate_rows"])
    from pipeline.data.split import held_out

    train = [e for e in examples if not held_out(e["prompt"], cfg.data.eval_fraction)]
    evals = [e for e in examples if held_out(e["prompt"], cfg.data.eval_fraction)]
    train_rows, eval_rows = group_examples(train, kinds), group_examples(evals, kinds)
    pair_counts = check_outcome_pairs(train_rows, objectives, kinds)
    if len(train_rows) < len(train):
        log.info("fit_prm: %d responses in %d training rows (outcome responses grouped by prompt, up to %d per row)",
                 len(train), len(train_rows), max(len(g["responses"]) for g in train_rows))
    tok_kw = {"model_dir": model_dir, "separator": cfg.separator, "max_length": cfg.max_length}
    datasets = {"train": train_rows, **({"eval": eval_rows} if eval_rows else {})}
    for k, v in datasets.items():  # tokenised once; steps cut by max_length counted, never silent
        ds = ray.data.from_arrow(pa.Table.from_pylist(v)).map_batches(tokenize_prm, fn_kwargs=tok_kw,
                                                                       batch_format="pyarrow").materialize()
        stats[k] = {"rows": len(v), "steps": int(ds.sum("n_steps") or 0), "steps_cut": int(ds.sum("cut_steps") or 0)}
        datasets[k] = ds.drop_columns(["n_steps", "cut_steps"])
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.output_dir, "tokenization.json").write_text(json.dumps(stats, indent=1))
    if cut := sum(stats[k]["steps_cut"] for k in ("train", "eval") if k in stats):
        log.warning("fit_prm: max_length %d cuts %d of %d labelled steps (dropped with their labels); see %s",
                    cfg.max_length, cut, sum(stats[k]["steps"] for k in ("train", "eval") if k in stats),
                    Path(cfg.output_dir, "tokenization.json"))
    weights = [loss_weights.get(o, 1.0) for o in objectives]
    head = initial_head(cfg, model_dir, objectives, kinds, train, evals)
    spec = build_spec(model_dir, objectives, kinds, weights, cfg.separator, head, padding_free=cfg.padding_free)
    spec.evaluate = functools.partial(prm_evaluate, objectives=objectives, kinds=kinds, collate=spec.collate)
    out = cfg.output_dir
    result = fit(spec, cfg.train, datasets, run_name=cfg.run_name, num_train_rows=len(train_rows), log_dir=f"{out}/logs",
                 export_dir=f"{out}/model")
    result.metrics.update({f"outcome_pairs/{o}": n for o, n in pair_counts.items()})
    result.metrics.update({"duplicate_rows": stats["duplicate_rows"],
                           **{f"steps_cut/{k}": stats[k]["steps_cut"] for k in ("train", "eval") if k in stats}})
    if head and head.get("metrics"):  # the probe alone, beside what fine-tuning made of it
        result.metrics.update(head["metrics"])
    return result


def initial_head(cfg, model_dir: str, objectives: list[str], kinds: list[str], train: list[dict],
                 evals: list[dict]) -> dict | None:
    """The value head's start (cfg.head_init): None (random), the label priors, or a linear probe
    fitted in a Ray task with one training worker's resources (a GPU where training has them)."""
    if cfg.head_init == "random":
        return None
    priors = label_priors(train, kinds)
    if cfg.head_init == "prior":
        return {"bias": priors}
    import ray

    from pipeline.train.prm_probe import probe_head

    t = cfg.train
    cpus = (t.resources_per_worker or {}).get("CPU", 1) * (1 if t.use_gpu else t.num_workers)  # workers not started yet
    task = ray.remote(num_cpus=cpus, num_gpus=1 if t.use_gpu else 0)(probe_head)
    sample = train if len(train) <= cfg.probe_examples else random.Random(t.seed).sample(train, cfg.probe_examples)
    return ray.get(task.remote(model_dir, objectives, kinds, cfg.separator, priors, sample, evals, cfg.max_length,
                               cfg.probe_c, t.bf16, t.use_gpu))
