"""Evidence for the main job's `shared_objectives` default (docs/tasks.md, "Shared objectives").

    python scripts/shared_objectives.py

1. Label kind and mean per (family, name) on the demonstration trajectories the main job labels
   beside its rollouts (no engine: judged / dialogue objectives by judge_prefix, the main job's
   setting; math accuracy by the verifier on the whole response, the outcome z of its MC labels).
2. math_word's and tutoring's definitions of `accuracy` and `engagement` applied to the same
   tutoring demonstration dialogues: do they agree?
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import MCConfig  # noqa: E402
from pipeline.labeling.demos import demo_trajectories  # noqa: E402
from pipeline.labeling.steps import DEFAULT_METHOD, label_objective  # noqa: E402
from pipeline.objectives import build_objectives  # noqa: E402
from pipeline.objectives.math_verifier import math_accuracy  # noqa: E402
from pipeline.tasks import get_task, math_word, splits, tutoring  # noqa: E402


def label_stats(n_train: int = 256, n_demos: int = 64) -> dict:
    problems, sft = [], []
    for task in ("math_word", "assistant", "tutoring"):
        p, d = splits(task, n_train, 0, 0)["train"]
        problems += p
        sft += d
    rows = demo_trajectories(problems, sft, n_demos)
    by_id = {p["id"]: p for p in problems}
    out = {}
    for task in ("math_word", "tutoring"):
        trajs = [{**r, "reference": by_id[r["problem_id"]]["reference"], "meta": json.loads(by_id[r["problem_id"]]["meta"])}
                 for r in rows if by_id[r["problem_id"]]["task"] == task]
        for name, obj in build_objectives(get_task(task).objectives).items():
            if obj.kind == "verifiable":  # MC labels need an engine: their outcome z instead
                z = obj.score_batch([{"prompt": t["prompt"], "response": "\n\n".join(t["steps"]),
                                      "reference": t["reference"], "meta": t["meta"]} for t in trajs])
                out[(task, name)] = {"kind": obj.kind, "method": "mc", "label_kind": "soft",
                                     "trajectories": len(trajs), "outcome_mean": round(st.mean(z), 3)}
                continue
            labs = label_objective("judge_prefix", None, obj, trajs, MCConfig(), {})
            xs = [x for lab in labs for x in lab.labels if x is not None]
            last = [lab.labels[-1] for lab in labs if lab.labels[-1] is not None]
            out[(task, name)] = {"kind": obj.kind, "method": "judge_prefix" if obj.kind == "judged" else DEFAULT_METHOD[obj.kind],
                                 "label_kind": labs[0].label_kind, "trajectories": len(trajs), "steps": len(xs),
                                 "label_mean": round(st.mean(xs), 3), "outcome_mean": round(st.mean(last), 3)}
    return out


def both_definitions(n: int = 256) -> list[dict]:
    """Each tutoring demonstration dialogue scored by both families' accuracy and engagement
    (math_word's on the tutor's turns as one response)."""
    probs, sft = splits("tutoring", n, 0, 0)["train"]
    last_turn = {}
    for d in sft:  # the last SFT record of a dialogue holds every turn before it
        last_turn[d["id"].rsplit("-demo-", 1)[0]] = d
    out = []
    for p in probs:
        if p["id"] not in last_turn:
            continue
        meta, d = json.loads(p["meta"]), last_turn[p["id"]]
        dialogue = list(d["prompt"]) + [{"role": "assistant", "content": d["completion"]}]
        dialogue.append({"role": "user", "content": tutoring.student(dialogue, meta)})
        resp = dialogue[len(p["prompt"]):]
        tutor = "\n\n".join(m["content"] for m in resp if m["role"] == "assistant")
        out.append({"style": meta["demo_style"],
                    "tut_acc": tutoring.accuracy(p["prompt"], resp, p["reference"], meta),
                    "math_acc": math_accuracy(p["prompt"], tutor, p["reference"], meta),
                    "tut_eng": tutoring.engagement(p["prompt"], resp, p["reference"], meta),
                    "math_eng": math_word.engagement(p["prompt"], tutor, p["reference"], meta)})
    return out


def main() -> None:
    for k, v in label_stats().items():
        print(k, v)
    rows = both_definitions()
    print("tutoring dialogues:", len(rows))
    for a, b in (("tut_acc", "math_acc"), ("tut_eng", "math_eng")):
        xa, xb = [r[a] for r in rows], [r[b] for r in rows]
        agree = sum((x >= 0.5) == (y >= 0.5) for x, y in zip(xa, xb)) / len(rows)
        print(f"{a} vs {b}: means {st.mean(xa):.3f} / {st.mean(xb):.3f}, pearson {st.correlation(xa, xb):.3f}, "
              f"verdict agreement {agree:.3f}")
    for style in sorted({r["style"] for r in rows}):
        rs = [r for r in rows if r["style"] == style]
        print(style, len(rs), {k: round(st.mean(r[k] for r in rs), 3) for k in ("tut_acc", "math_acc", "tut_eng", "math_eng")})


if __name__ == "__main__":
    main()
