"""How far a trained multi-head policy's heads and top layers moved from the SFT model, and how far apart the
heads are: what a weight sweep has to steer with.

    .venv/bin/python scripts/head_movement.py --policy runs/main/policy_mahdpo/model_best --sft runs/main/sft/model \
        [--noise_std 1e-3] [--seed 0] [--prompts runs/main/eval/responses.parquet]

Norms are relative to the SFT head's (or the SFT matrix's) Frobenius norm. `init noise` is what the seeded head
init (dpo.noise_std, dpo.seed) adds. With --prompts, it also prints the logit gap that matters for steering: on the
SFT responses of each task, the mean |log pi_i(y_t) - log pi_j(y_t)| per token between the task's two heads, and
the mean per-token log-prob change of the equal-weight mix against the SFT model.
"""

from __future__ import annotations

import argparse
import json

import torch

from pipeline.models.multihead import MultiHeadPolicy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--noise_std", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default=None, help="eval/responses.parquet: token-level gaps on SFT's responses")
    ap.add_argument("--n", type=int, default=16, help="responses per task for --prompts")
    a = ap.parse_args()
    pol = MultiHeadPolicy.load(a.policy)
    # the heads as MAH-DPO started them (SFT head + the seeded noise); its base is the SFT model
    start = MultiHeadPolicy.from_sft(a.sft, pol.objectives, a.noise_std, a.seed)
    sft = start.base
    w0 = sft.get_output_embeddings().weight.detach()
    heads, init = pol.heads.detach(), start.heads.detach()
    print(f"init noise: {rel(init[0], w0):.4%} of the SFT head's norm")
    print("| head | moved from SFT | moved from its init |")
    print("|---|---:|---:|")
    for i, o in enumerate(pol.objectives):
        print(f"| {o} | {rel(heads[i], w0):.4%} | {rel(heads[i], init[i]):.4%} |")
    print("\n| head pair (one task's) | distance (of the SFT head's norm) |\n|---|---:|")
    fam = [o.split("/")[0] for o in pol.objectives]
    for i in range(len(pol.objectives)):
        for j in range(i + 1, len(pol.objectives)):
            if fam[i] == fam[j]:
                print(f"| {pol.objectives[i]} - {pol.objectives[j]} | {float((heads[i] - heads[j]).norm() / w0.norm()):.4%} |")
    sd_sft = {n: p.detach() for n, p in sft.named_parameters()}
    moved = sorted(((rel(p, sd_sft[n]), n) for n, p in ((n, p.detach()) for n, p in pol.base.named_parameters())
                    if n in sd_sft and p.dim() == 2 and not torch.equal(p, sd_sft[n])), reverse=True)
    print(f"\nbackbone matrices changed: {len(moved)}; largest relative change {moved[0][0]:.4%} ({moved[0][1]}), "
          f"median {moved[len(moved) // 2][0]:.4%}" if moved else "\nbackbone: unchanged")
    if not a.prompts:
        return
    import pyarrow.parquet as pq

    from pipeline.models.checkpoint import load_tokenizer

    tok = load_tokenizer(a.sft)
    rows = [r for r in pq.read_table(a.prompts).to_pylist() if r["policy"].lower() == "sft" and r["decoding"] == "plain"]
    print("\n| task | heads | mean abs per-token log-prob gap between the two heads | equal mix vs SFT | tokens |")
    print("|---|---|---:|---:|---:|")
    for task in sorted({r["task"] for r in rows}):
        ids = [i for i, o in enumerate(pol.objectives) if o.startswith(task + "/")]
        if len(ids) != 2:
            continue
        gaps, shift, n = 0.0, 0.0, 0
        for r in [r for r in rows if r["task"] == task][: a.n]:
            msgs = json.loads(r["prompt"])
            resp = r["response"]
            try:
                resp = json.loads(resp)
            except (TypeError, ValueError):
                pass
            # a dialogue: the tutor's first turn (its later turns follow the simulated student's replies)
            text = resp if isinstance(resp, str) else next((m["content"] for m in resp if m.get("role") == "assistant"), "")
            p_ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
            y_ids = tok(text, add_special_tokens=False)["input_ids"][:256]
            if not y_ids:
                continue
            x = torch.tensor([p_ids + y_ids])
            with torch.no_grad():
                h = pol.hidden(x).last_hidden_state[0, len(p_ids) - 1: -1].float()
                tgt = torch.tensor(y_ids)
                lp = [torch.log_softmax(h @ heads[i].float().T, -1)[torch.arange(len(y_ids)), tgt] for i in ids]
                mix = torch.log_softmax(h @ heads[ids].float().mean(0).T, -1)[torch.arange(len(y_ids)), tgt]
                ref = torch.log_softmax(sft(x).logits[0, len(p_ids) - 1: -1].float(), -1)[torch.arange(len(y_ids)), tgt]
            gaps += float((lp[0] - lp[1]).abs().sum())
            shift += float((mix - ref).sum())
            n += len(y_ids)
        print(f"| {task} | {pol.objectives[ids[0]]} / {pol.objectives[ids[1]]} | {gaps / max(n, 1):.4f} | "
              f"{shift / max(n, 1):+.4f} | {n} |")


if __name__ == "__main__":
    main()
