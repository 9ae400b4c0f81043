"""PRM-guided decoding: the continuing KV cache against re-encoding, at equal K.

    .venv/bin/python bench/guided_decoding.py [--model smollm2-135m-instruct] [--prm DIR] [--k 4] [--prompts 4]

Policy: a 3-head MultiHeadPolicy built from `--model` (heads = its LM head + noise;
trained weights do not change the cost). PRM: `--prm` (a jobs.fit_prm checkpoint) or
a VectorPRM with an untrained head on the same backbone. Built-in math problems,
step boundary `blank_lines` (falls back to the step-token limit), the same seeds in
both runs, so both search the same candidates:
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
    from pipeline.tasks import math_word

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    policy = MultiHeadPolicy.from_sft(model_dir, ["accuracy", "engagement", "concision"]).eval()
    tok = load_tokenizer(model_dir)
    if args.prm:
        prm, ptok = VectorPRM.load(args.prm)
    else:
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
    problems, _ = math_word.generate(args.prompts, 1, "eval")
    if args.shots:
        _, demos = math_word.generate(args.shots, 2, "train")
        shots = [m for d in demos for m in ({"role": "user", "content": d["prompt"][-1]["content"]},
                                             {"role": "assistant", "content": d["completion"]})]
        problems = [{**p, "prompt": p["prompt"][:1] + shots + p["prompt"][1:]} for p in problems]
    prm_w = [1.0] + [0.0] * (len(prm.objectives) - 1)
    res = {}
    for mode in ("cache", "reencode"):
        prm_time[0] = 0.0
        tokens = 0
        t0 = time.perf_counter()
        for i, p in enumerate(problems):
            r = guided_generate(policy, tok, prm, ptok, p["prompt"], weights=[0.6, 0.2, 0.2], prm_weights=prm_w,
                                candidates=args.k, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                                max_new_tokens=args.max_steps * args.max_step_tokens, boundary="blank_lines",
                                temperature=0.8, seed=i, reencode=mode == "reencode")
            tokens += len(r.token_ids)
        total = time.perf_counter() - t0
        res[mode] = {"total": total, "prm": prm_time[0], "policy": total - prm_time[0], "tokens": tokens}
        print(f"{mode:8s} {total:7.1f} s total  {total - prm_time[0]:7.1f} s policy  {prm_time[0]:6.1f} s PRM  "
              f"{tokens} tokens kept")
    c, r = res["cache"], res["reencode"]
    prefix = sum(len(tok(tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]) for p in problems)
    print(f"prompts of {prefix / len(problems):.0f} tokens on average ({args.shots} shots)")
    print(f"continuing cache vs re-encoding at K={args.k}: {r['total'] / c['total']:.2f}x whole search, "
          f"{r['policy'] / c['policy']:.2f}x policy part (target >= 3x; tokens kept {c['tokens']} vs {r['tokens']})")


if __name__ == "__main__":
    main()
