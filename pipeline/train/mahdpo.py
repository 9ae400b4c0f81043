"""MAH-DPO and its single-head baselines, through the shared harness.

    L = sum_i a_i * mean_{pairs of objective i} DPO(pair; head i) / sum_i a_i

Each pair trains only its own objective's head (and the shared backbone). Batches
are balanced: each training row is a group of one pair per objective, so every
micro-batch holds `micro_batch_size` pairs of every objective. `dpo.balance`
says how objectives of unequal size are made equal: `truncate` cuts every one
to the smallest (the paper's recipe: with thousands of pairs per objective it
loses little), `cycle` repeats the smaller ones (reshuffled each pass) up to the
largest, so no pair is discarded (the CPU main job: its smallest objective had 7
pairs of 114). Chosen and
rejected go through one forward pass; each example gets only its own head's
logits. Reference log-probs come from the preference shards (jobs.build_pairs /
jobs.ref_logps); where a row lacks them, the worker computes them with the SFT
model, which is the reference policy of every head.

Methods: `mahdpo` (one head per objective), `single` (one head, DPO on the pooled pairs,
the same truncated pairs), `soup` (one single-head DPO model per objective;
`pipeline.models.soup.merge_soup` averages their weights), `modpo` (one head, MODPO for one weight vector on the pooled
pairs of the objectives it weights: each pair's margin comes from its responses' scores
on the other objectives).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.models.collate import PairCollate
from pipeline.models.logps import causal_lm_logps
from pipeline.models.multihead import MultiHeadPolicy, load_checked
from pipeline.models.precision import dtype_name
from pipeline.models.tokenize import TOKENIZATION, encode_pair
from pipeline.train.dpo_losses import completion_lengths, dpo_loss, modpo_loss, per_head_loss, rpo_nll
from pipeline.train.harness import FitResult, TrainSpec, check_whole, whole_models

log = logging.getLogger(__name__)
REF_META = "_ref_logps.json"


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from pipeline.models.checkpoint import load_tokenizer

    return load_tokenizer(model_dir)


def groups_per_epoch(rows_by_objective: dict[str, list[dict]], objectives: list[str], balance: str) -> int:
    """truncate: the smallest objective's pair count; cycle: the largest's."""
    sizes = [len(rows_by_objective[o]) for o in objectives]
    return min(sizes) if balance == "truncate" else max(sizes)


def balanced_groups(rows_by_objective: dict[str, list[dict]], objectives: list[str], seed: int,
                    balance: str = "truncate") -> list[list[dict]]:
    """Groups of one pair per objective. truncate: every objective cut to the smallest (seeded shuffle);
    cycle: every objective filled up to the largest by repeating its pairs, each pass shuffled anew."""
    n = groups_per_epoch(rows_by_objective, objectives, balance)
    cut = {}
    for i, o in enumerate(objectives):
        rows: list[dict] = []
        for p in range(-(-n // max(len(rows_by_objective[o]), 1))):  # passes (one when truncating)
            order = list(rows_by_objective[o])
            random.Random(seed + i + 1000 * p).shuffle(order)  # pass 0 keeps the paper's seed + dim
            rows += order
        cut[o] = rows[:n]
    return [[cut[o][g] for o in objectives] for g in range(n)]


def groups_table(groups: list[list[dict]], head_of: dict[str, int], objective_index: dict[str, int]) -> pa.Table:
    """One row per group; list columns hold the group's pairs."""
    def col(f):
        return [[f(r) for r in g] for g in groups]

    def ref(key):
        return col(lambda r: float("nan") if r.get(key) is None else float(r[key]))

    return pa.table({
        "head": pa.array(col(lambda r: head_of[r["objective"]]), pa.list_(pa.int32())),
        "objective_id": pa.array(col(lambda r: objective_index[r["objective"]]), pa.list_(pa.int32())),
        "prompt": pa.array(col(lambda r: json.dumps(r["prompt"])), pa.list_(pa.string())),
        "chosen": pa.array(col(lambda r: r["chosen"]), pa.list_(pa.string())),
        "rejected": pa.array(col(lambda r: r["rejected"]), pa.list_(pa.string())),
        "ref_chosen": pa.array(ref("ref_chosen_logp"), pa.list_(pa.float32())),
        "ref_rejected": pa.array(ref("ref_rejected_logp"), pa.list_(pa.float32())),
        # MODPO's w_k and margin (NaN: plain DPO)
        "modpo_scale": pa.array(ref("modpo_scale"), pa.list_(pa.float32())),
        "modpo_margin": pa.array(ref("modpo_margin"), pa.list_(pa.float32())),
    })


def tokenize_groups(batch: pa.Table, model_dir: str, max_length: int, max_prompt_length: int) -> pa.Table:
    tok = _tokenizer(model_dir)
    cols = {k: [] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")}
    for ps, cs, rs in zip(*(batch.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))):
        enc = [encode_pair(tok, json.loads(p), c, r, max_length, max_prompt_length) for p, c, r in zip(ps, cs, rs)]
        if any(e["refused"] for e in enc):  # refuse_long_pairs removed these before grouping
            raise ValueError(f"a pair's prompt does not fit max_prompt_length {max_prompt_length} even with its "
                             "earliest turns dropped; run_fit_policy should have refused it (refuse_long_pairs)")
        for k in cols:
            cols[k].append([e[k] for e in enc])
    out = {k: pa.array(v, pa.list_(pa.list_(pa.int32()))) for k, v in cols.items()}
    for k in ("head", "objective_id", "ref_chosen", "ref_rejected", "modpo_scale", "modpo_margin"):
        out[k] = batch.column(k)
    return pa.table(out)


def _device_key(device) -> str:
    return str(torch.empty(0, device=device).device)  # "cuda" and "cuda:0" are one device, one cache entry


@functools.lru_cache(maxsize=1)
def _reference(model_dir: str, dtype: str, device: str):
    # A whole, frozen copy in every worker, also under ZeRO-3 (whole_models): its forward runs no
    # collective, so a rank whose batch has cached log-probs may skip it while another runs it.
    with whole_models():
        ref = load_checked(model_dir, dtype).to(device).eval()
    check_whole(ref, f"reference model {model_dir}")
    ref.requires_grad_(False)
    return ref


def load_reference(model_dir: str, dtype: str, device) -> None:
    """TrainSpec.setup: every worker loads the reference before the first step (not mid-step in the loss)."""
    _reference(model_dir, dtype, _device_key(device))


@torch.no_grad()
def reference_logps(model_dir: str, dtype: str, batch: dict) -> torch.Tensor:
    ref = _reference(model_dir, dtype, _device_key(batch["input_ids"].device))
    return causal_lm_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])


def mahdpo_loss(model, batch, *, objectives: list[str], head_weights: list[float], beta: float, loss_type: str,
                label_smoothing: float, ref_model: str, ref_dtype: str, padding_free: bool = False,
                rpo_alpha: float | None = None):
    n = batch["head"].numel()
    heads = batch["head"]
    # chosen and rejected in one forward; only their completion tokens are projected on the vocabulary
    logps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], head_ids=torch.cat([heads, heads]),
                  labels=batch["labels"], packed=padding_free).logps
    ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    if torch.isnan(ref_c).any() or torch.isnan(ref_r).any():
        r = reference_logps(ref_model, ref_dtype, batch)
        ref_c, ref_r = r[:n], r[n:]
    n_tok = completion_lengths(batch["labels"])  # ipo averages log-probs over completion tokens (TRL); RPO too
    if torch.isnan(batch["modpo_scale"]).any():
        losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta, loss_type, label_smoothing,
                                  lengths=(n_tok[:n], n_tok[n:]))
    else:
        losses, rc, rr = modpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta, batch["modpo_scale"].to(logps.device),
                                    batch["modpo_margin"].to(logps.device), label_smoothing)
    nll = rpo_nll(logps[:n].detach() if not rpo_alpha else logps[:n], n_tok[:n])  # logged either way
    total, _ = per_head_loss(losses + rpo_alpha * nll if rpo_alpha else losses, heads, head_weights)
    # the preference term alone (eval/dpo_loss: where the held-out preference fit turns, RPO or not)
    metrics = {"dpo_loss": per_head_loss(losses.detach(), heads, head_weights)[0] if rpo_alpha else total.detach()}
    for j in torch.unique(batch["objective_id"]).tolist():
        m = batch["objective_id"] == j
        o = objectives[j]  # {o}/loss: the DPO term alone
        metrics.update({f"{o}/loss": losses[m].mean().detach(), f"{o}/reward_accuracy": (rc[m] > rr[m]).float().mean(),
                        f"{o}/margin": (rc[m] - rr[m]).mean(), f"{o}/chosen_reward": rc[m].mean(),
                        f"{o}/rejected_reward": rr[m].mean(), f"{o}/chosen_nll": nll[m].mean().detach()})
    return total, metrics


def export_policy(module: MultiHeadPolicy, state_dict: dict, out_dir: str, tokenizer_dir: str) -> None:
    module.save(out_dir, tokenizer=_tokenizer(tokenizer_dir), state_dict=state_dict)


class SoupMembers(torch.nn.Module):
    """The single-head DPO models of a soup, trained side by side in one run: each pair goes
    through its own objective's member only, so each member learns from its objective's pairs
    alone, as in separate runs (the loss is the members' mean, a scale Adam ignores), and the
    cluster starts one training run instead of one per objective."""

    def __init__(self, members: list[MultiHeadPolicy]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config

    @classmethod
    def from_sft(cls, path, objectives, noise_std=1e-3, seed=0, dtype="float32", head_rank=0,
                 train_layers=0) -> "SoupMembers":
        return cls([MultiHeadPolicy.from_sft(path, [o], noise_std, seed, dtype, head_rank, train_layers)
                    for o in objectives])

    def forward(self, input_ids, attention_mask=None, head_ids=None, labels=None, **kw):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from pipeline.models.multihead import SequenceLogps

        parts, order = [], []
        for j in torch.unique(head_ids).tolist():
            idx = (head_ids == j).nonzero().squeeze(1)
            out = self.members[j](input_ids.index_select(0, idx), attention_mask.index_select(0, idx), head_ids=0,
                                  labels=None if labels is None else labels.index_select(0, idx),
                                  packed=kw.get("packed", False))
            parts.append(out.logits if labels is None else out.logps)
            order.append(idx)
        joined = torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))
        return CausalLMOutputWithPast(logits=joined) if labels is None else SequenceLogps(joined)


def export_soup(module: SoupMembers, state_dict: dict, out_dir: str, tokenizer_dir: str) -> None:
    """Each member as its own policy: <output_dir>/<objective>/<name> for out_dir <output_dir>/<name> (model,
    model_best, model_step<n>: the best or an intermediate export does not overwrite the final members)."""
    out = Path(out_dir)
    for j, m in enumerate(module.members):
        prefix = f"members.{j}."
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        m.save(out.parent / m.objectives[0] / out.name, tokenizer=_tokenizer(tokenizer_dir), state_dict=sd)


def build_spec(model_dir: str, heads: list[str], objectives: list[str], dpo, bf16: bool, params: dict | None = None,
               soup: bool = False, needs_reference: bool = False) -> TrainSpec:
    """heads: the policy's head names; objectives: the names pairs are tagged with (metrics).
    soup: one single-head model per head name instead of one multi-head model.
    needs_reference: some pairs lack cached reference log-probs; every worker loads the reference first."""
    build = SoupMembers.from_sft if soup else MultiHeadPolicy.from_sft
    return TrainSpec(
        build_model=functools.partial(build, model_dir, heads, dpo.noise_std, dpo.seed, dtype_name(bf16),
                                      dpo.head_rank, dpo.train_layers),
        collate=PairCollate(_tokenizer(model_dir).pad_token_id),
        loss=functools.partial(mahdpo_loss, objectives=objectives,
                               head_weights=[dpo.loss_weights.get(h, 1.0) for h in heads], beta=dpo.beta,
                               loss_type=dpo.loss_type, label_smoothing=dpo.label_smoothing, ref_model=model_dir,
                               ref_dtype=dpo.ref_dtype, padding_free=dpo.padding_free, rpo_alpha=dpo.rpo_alpha),
        export=functools.partial(export_soup if soup else export_policy, tokenizer_dir=model_dir),
        params=params or {},
        named_lrs={n: dpo.head_lr for n in ("heads", "head_up", "head_down")} if dpo.head_lr else {},
        setup=functools.partial(load_reference, model_dir, dpo.ref_dtype) if needs_reference else None,
    )


def check_ref_meta(paths: list[str], model_dir: str, dpo) -> None:
    """Cached reference log-probs must come from this SFT model and this tokenisation."""
    for p in paths:
        f = Path(p) / REF_META
        if not f.exists():
            continue
        meta = json.loads(f.read_text())
        want = {"model": str(Path(model_dir).resolve()), "max_length": dpo.max_length,
                "max_prompt_length": dpo.max_prompt_length, "dtype": dpo.ref_dtype, "tokenization": TOKENIZATION}
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            raise ValueError(f"{f}: the cached reference log-probs were computed with other settings "
                             f"{ {k: a for k, (a, _) in bad.items()} } than this run's { {k: b for k, (_, b) in bad.items()} }; "
                             "rerun jobs.build_pairs with the same dpo settings, or set dpo.recompute_ref: true")


def modpo_terms(rows: list[dict], weights: dict[str, float]) -> None:
    """Sets each row's MODPO scale w_k and margin sum_{j != k} w_j (r_j(chosen) - r_j(rejected)) from its
    `scores`. An objective the row was not scored on (another task's) adds no margin."""
    for r in rows:
        scores = {s["objective"]: s for s in r.get("scores") or []}
        if not scores:
            raise ValueError(f"pair {r['id']!r} (objective {r['objective']}): no 'scores'; MODPO needs each pair's "
                             "responses scored on the other objectives (jobs.build_pairs writes them)")
        r["modpo_scale"] = weights.get(r["objective"], 0.0)
        r["modpo_margin"] = sum(w * (scores[j]["chosen"] - scores[j]["rejected"])
                                for j, w in weights.items() if j != r["objective"] and j in scores)


def plan_runs(method: str, objectives: list[str], by_obj: dict[str, list[dict]], held: list[dict], seed: int,
              soup_together: bool = False, modpo_weights: dict[str, float] | None = None, balance: str = "truncate"):
    """[(name, head names, training groups, objective -> head, eval rows)], one per run to fit."""
    index = {o: i for i, o in enumerate(objectives)}
    if method == "modpo":  # only the weighted objectives' pairs (the loss divides by w_k)
        objectives = [o for o in objectives if (modpo_weights or {}).get(o, 0) > 0]
        held = [r for r in held if r["objective"] in objectives]
    cut = balanced_groups(by_obj, objectives, seed, balance)
    if method == "mahdpo":
        return [("", objectives, cut, index, held)]
    if method in ("single", "modpo"):  # the same pairs, pooled into one head, as many per step as MAH-DPO's groups
        pooled = [r for g in cut for r in g]
        random.Random(seed).shuffle(pooled)
        k = len(objectives)
        return [("", ["pooled" if method == "single" else "modpo"], [pooled[i: i + k] for i in range(0, len(pooled), k)],
                 {o: 0 for o in index}, held)]
    # soup: one single-head model per objective, each on its objective's pairs (the same balanced cut,
    # one pair per step as MAH-DPO gives each head); in one run, a group routes pair i to member i
    if soup_together:
        return [("", objectives, cut, index, held)]
    return [(o, [o], [[g[i]] for g in cut], {o: 0}, [r for r in held if r["objective"] == o])
            for i, o in enumerate(objectives)]


def balance_report(by_obj: dict[str, list[dict]], objectives: list[str], held: list[dict], out_dir: Path,
                   balance: str = "truncate") -> dict:
    """What the balancing keeps, repeats and discards per objective (truncate: every objective cut to the
    smallest; cycle: filled up to the largest by repeats), logged and written to out_dir/pairs_used.json,
    so a cut is never silent."""
    n = groups_per_epoch(by_obj, objectives, balance)

    def entry(o):
        k = len(by_obj[o])
        slots = n if o in objectives else 0  # pairs of this objective per epoch
        return {"pairs": k, "used": min(k, slots), "discarded": k - min(k, slots), "repeated": max(slots - k, 0)}

    report = {"balance": balance, "groups_per_epoch": n, "held_out": len(held),
              "per_objective": {o: entry(o) for o in by_obj}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pairs_used.json").write_text(json.dumps(report, indent=1))
    if dropped := {o: v["discarded"] for o, v in report["per_objective"].items() if v["discarded"]}:
        log.warning("fit_policy: the balanced cut keeps %d training pairs per objective and discards %s (%d in all); "
                    "see %s", n, dropped, sum(dropped.values()), out_dir / "pairs_used.json")
    if repeated := {o: v["repeated"] for o, v in report["per_objective"].items() if v["repeated"]}:
        log.info("fit_policy: dpo.balance cycle: %d groups per epoch; pairs repeated to fill them: %s", n, repeated)
    return report


def refuse_long_pairs(rows: list[dict], model_dir: str, dpo, out_dir: Path) -> list[dict]:
    """The pairs encode_pair can tokenise; refused ones (the prompt's last user turn alone exceeds
    max_prompt_length) are counted, logged and reported in out_dir/tokenization.json."""
    tok = _tokenizer(model_dir)
    kept, refused, truncated = [], [], 0
    for r in rows:
        e = encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], dpo.max_length, dpo.max_prompt_length)
        (refused if e["refused"] else kept).append(r)
        truncated += e["truncated"] and not e["refused"]
    report = {"pairs": len(rows), "refused": len(refused), "truncated": truncated,
              "refused_ids": [r["id"] for r in refused[:20]]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenization.json").write_text(json.dumps(report, indent=1))
    if refused:
        log.warning("fit_policy: %d of %d pairs refused: the prompt's last user turn alone exceeds "
                    "dpo.max_prompt_length %d (e.g. %s); see %s", len(refused), len(rows), dpo.max_prompt_length,
                    report["refused_ids"][:3], out_dir / "tokenization.json")
    return kept


def run_fit_policy(cfg) -> dict[str, FitResult]:
    """Fit the policy (pipeline.config.PolicyJobConfig); returns {name: FitResult} (one per soup member)."""
    import ray

    from pipeline.data.io import read_records
    from pipeline.data.split import held_out
    from pipeline.models.registry import resolve_model
    from pipeline.objectives.registry import resolve_keys, resolve_objective
    from pipeline.train.harness import fit

    model_dir = resolve_model(cfg.model.name_or_path)
    if not cfg.dpo.recompute_ref:
        check_ref_meta(cfg.data.paths, model_dir, cfg.dpo)
    table, _ = read_records(cfg.data.paths, "preference", defaults=cfg.data.defaults,
                            skip_bad_rows=cfg.data.skip_bad_rows, quarantine_dir=cfg.data.quarantine_dir)
    rows = refuse_long_pairs(table.to_pylist(), model_dir, cfg.dpo, Path(cfg.output_dir))
    if cfg.dpo.recompute_ref:  # ignore cached values: each worker runs the SFT model as the reference
        for r in rows:
            r["ref_chosen_logp"] = r["ref_rejected_logp"] = None
    needs_reference = any(r.get("ref_chosen_logp") is None or r.get("ref_rejected_logp") is None for r in rows)
    # config names are resolved against the data's objective ids (`math_word/accuracy`): a bare name
    # that ends exactly one id means it; one that ends two is an error naming both, never a merge
    in_data = sorted({r["objective"] for r in rows})
    objectives = [resolve_objective(o, in_data, f"objectives ({cfg.data.paths}):") for o in cfg.objectives] or in_data
    modpo_weights = resolve_keys(cfg.modpo_weights, objectives, "modpo_weights:")
    dpo = cfg.dpo.model_copy(update={"loss_weights": resolve_keys(cfg.dpo.loss_weights, objectives, "dpo.loss_weights:")})
    by_obj: dict[str, list[dict]] = {o: [] for o in objectives}
    held: list[dict] = []
    for r in rows:
        if r["objective"] not in by_obj:
            continue
        (held if cfg.data.eval_fraction and held_out(r["prompt"], cfg.data.eval_fraction) else by_obj[r["objective"]]).append(r)
    empty = [o for o, rs in by_obj.items() if not rs]
    if empty:
        raise ValueError(f"no training pairs for objective(s) {empty} in {cfg.data.paths}")
    if cfg.method == "modpo":
        total = sum(modpo_weights.values())
        modpo_terms([r for r in [r for rs in by_obj.values() for r in rs] + held if modpo_weights.get(r["objective"])],
                    {o: w / total for o, w in modpo_weights.items()})
    index = {o: i for i, o in enumerate(objectives)}
    tok_kw = {"model_dir": model_dir, "max_length": cfg.dpo.max_length, "max_prompt_length": cfg.dpo.max_prompt_length}

    def dataset(groups, head_of):
        t = groups_table(groups, head_of, index)
        return ray.data.from_arrow(t).map_batches(tokenize_groups, fn_kwargs=tok_kw, batch_format="pyarrow")

    runs = plan_runs(cfg.method, objectives, by_obj, held, dpo.seed, cfg.soup_together, modpo_weights, dpo.balance)
    balance_report(by_obj, [o for o in objectives if cfg.method != "modpo" or modpo_weights.get(o, 0) > 0], held,
                   Path(cfg.output_dir), dpo.balance)
    together = cfg.method == "soup" and cfg.soup_together
    results = {}
    out = Path(cfg.output_dir)
    for name, heads, groups, head_of, evals in runs:
        sub = out / name if name else out
        datasets = {"train": dataset(groups, head_of)}
        if evals:
            datasets["eval"] = dataset([[r] for r in evals], {o: head_of.get(o, 0) for o in objectives})
        spec = build_spec(model_dir, heads, objectives, dpo, cfg.train.bf16, soup=together,
                          needs_reference=needs_reference, params={"method": cfg.method, "heads": heads, "model": model_dir, **dpo.model_dump()})
        log.info("fit_policy[%s%s]: %d groups of %d pair(s), heads %s", cfg.method, f":{name}" if name else "",
                 len(groups), len(groups[0]), heads)
        # a soup member's name is an objective id ("math_word/accuracy"): no '/' in the Ray Train run name
        r = fit(spec, cfg.train, datasets, run_name=f"{cfg.run_name}{'-' + name.replace('/', '-') if name else ''}",
                num_train_rows=len(groups), log_dir=str(sub / "logs"), export_dir=str(sub / "model"))
        if together:  # one result per member, each with its own export
            import dataclasses

            for o in objectives:
                results[o] = dataclasses.replace(r, export_dir=str(out / o / "model"),
                                                 best_dir=str(out / o / "model_best") if r.best_dir else None)
        else:
            results[name or cfg.method] = r
    return results
