"""PRM-guided decoding: the continuing KV cache against re-encoding, at equal K.

    .venv/bin/python bench/guided_decoding.py [--model smollm2-135m-instruct] [--prm DIR] [--k 4] [--prompts 4]

Policy: a 3-head MultiHeadPolicy built from `--model` (heads = its LM head + noise;
trained weights do not change the cost). PRM: `--prm` (a jobs.fit_prm checkpoint) or
a VectorPRM with an untrained head on the same backbone. `--task math`: built-in math
problems, step boundary `blank_lines` (falls back to the step-token limit), as the paper's
math search; `--task assistant`: built-in open-ended prompts, step boundary `sentences`,
as the paper's human-values search (many short steps). The same seeds in both runs, so
both search the same candidates:
  cache     pipeline.decoding.guided (candidates from a copy of the running cache);
  reencode  the same search, the prefix encoded again for each of the K candidates at
            every step (what model.generate(prefix, num_return_sequences=K) does).
The PRM's part is timed apart: with the cache it encodes only the candidates' tokens on its
running cache (PRMPrefix); re-encoding, the whole prefix + candidate for each of the K.
The ratio is printed for the whole search and for the policy's part. Target: >= 3x (the
paper: 4.2x).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prm", default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--task", choices=("math", "assistant"), default="math")
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--max-step-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    # few-shot solved examples before the problem: a longer prefix (what re-encoding repeats), as in
    # dialogues or many-shot prompts
    ap.add_argument("--shots", type=int, default=0)
    args = ap.parse_args()
    import torch

    from pipeline.decoding import guided
    from pipeline.decoding.guided import guided_generate
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy
    from pipeline.models.prm import VectorPRM, build_prm
    from pipeline.models.registry import resolve_model
    from pipeline.tasks import assistant, math_word

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    policy = MultiHeadPolicy.from_sft(model_dir, ["accuracy", "engagement", "concision"]).eval()
    tok = load_tokenizer(model_dir)
    if args.prm:
        prm, ptok = VectorPRM.load(args.prm)
    else:  # seeded: the untrained head picks the winners, so it decides how long the solutions grow
        torch.manual_seed(0)
        prm, ptok = build_prm(model_dir, ["accuracy"], {"accuracy": "soft"})
    prm.eval()
    prm_time = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                prm_time[0] += time.perf_counter() - t0
        return wrapper

    prm.score_last = timed(prm.score_last)  # re-encoding
    guided.PRMPrefix.__init__ = timed(guided.PRMPrefix.__init__)  # the cache: the prompt once, then candidates
    guided.PRMPrefix.score = timed(guided.PRMPrefix.score)
    guided.PRMPrefix.accept = timed(guided.PRMPrefix.accept)
    task = math_word if args.task == "math" else assistant
    boundary = "blank_lines" if args.task == "math" else "sentences"
    problems, _ = task.generate(args.prompts, 1, "eval")
    if args.shots:
        _, demos = task.generate(args.shots, 2, "train")
        shots = [m for d in demos for m in ({"role": "user", "content": d["prompt"][-1]["content"]},
                                             {"role": "assistant", "content": d["completion"]})]
        problems = [{**p, "prompt": p["prompt"][:1] + shots + p["prompt"][1:]} for p in problems]
    prm_w = [1.0] + [0.0] * (len(prm.objectives) - 1)
    runs = []  # per prompt: {mode: (total s, PRM s, token ids, steps)}, the two searches back to back
    for i, p in enumerate(problems):
        runs.append({})
        for mode in ("cache", "reencode"):
            prm_time[0] = 0.0
            t0 = time.perf_counter()
            r = guided_generate(policy, tok, prm, ptok, p["prompt"], weights=[0.6, 0.2, 0.2], prm_weights=prm_w,
                                candidates=args.k, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                                max_new_tokens=args.max_steps * args.max_step_tokens, boundary=boundary,
                                temperature=0.8, seed=i, reencode=mode == "reencode")
            runs[-1][mode] = (time.perf_counter() - t0, prm_time[0], r.token_ids, len(r.steps))
        c, r = runs[-1]["cache"], runs[-1]["reencode"]
        print(f"prompt {i}: cache {c[0]:6.1f} s (PRM {c[1]:5.1f})  reencode {r[0]:6.1f} s (PRM {r[1]:5.1f})  "
              f"{len(c[2])} / {len(r[2])} tokens kept, {c[3]} / {r[3]} steps"
              f"{'' if c[2] == r[2] else '  (diverged: floating-point differences changed a sample or the PRM pick)'}")
    prefix = sum(len(tok(tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]) for p in problems)
    print(f"{args.task}: prompts of {prefix / len(problems):.0f} tokens on average ({args.shots} shots), "
          f"{sum(x['cache'][3] for x in runs) / len(runs):.1f} steps per response")

    def ratios(sel: list[dict], label: str) -> None:
        tot = {m: sum(x[m][0] for x in sel) for m in ("cache", "reencode")}
        pol = {m: sum(x[m][0] - x[m][1] for x in sel) for m in ("cache", "reencode")}
        print(f"{label}: cache {tot['cache']:.1f} s, re-encoding {tot['reencode']:.1f} s: "
              f"{tot['reencode'] / tot['cache']:.2f}x whole search, {pol['reencode'] / pol['cache']:.2f}x policy part")

    print(f"continuing cache vs re-encoding at K={args.k} (target >= 3x):")
    ratios(runs, f"  all {len(runs)} prompts")
    same = [x for x in runs if x["cache"][2] == x["reencode"][2]]
    if same and len(same) < len(runs):  # a diverged prompt searched different candidates: not like for like
        ratios(same, f"  the {len(same)} prompts where both kept the same tokens")

if __name__ == "__main__":
    main()
