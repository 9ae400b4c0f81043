"""Score a trained PRM on stepwise shards and print its metrics against the trivial baselines.

    python scripts/eval_prm.py PRM_DIR LABELS_DIR [LABELS_DIR ...]

Per objective: steps, AUROC, MSE and the MSE of predicting the mean (the same
metrics jobs.fit_prm logs on its held-out prompts), on every labelled step of the
shards: use it on labels of problems the PRM never saw (for example the eval
split's demonstrations, labelled by jobs.label_steps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prm")
    ap.add_argument("labels", nargs="+")
    args = ap.parse_args()
    import numpy as np
    import torch
    from tqdm import tqdm

    from pipeline.data import read_records
    from pipeline.models.prm import VectorPRM
    from pipeline.train.prm import merge_stepwise
    from pipeline.train.prm_metrics import baseline_table, objective_metrics

    model, tok = VectorPRM.load(args.prm)
    model.eval()
    rows = [r for r in read_records(args.labels, "stepwise")[0].to_pylist() if r["objective"] in model.objectives]
    preds, labels, groups, prompts = [], [], [], {}
    with torch.no_grad():
        for ex in tqdm(merge_stepwise(rows, model.objectives), desc="score", mininterval=5):
            preds.append(model.score(tok, ex["prompt"], ex["completions"]).numpy())
            labels.append(np.array([[np.nan if x is None else x for x in step] for step in ex["labels"]], dtype=float))
            # outcome objectives compare responses to the same prompt
            groups.append(np.full(len(ex["labels"]), prompts.setdefault(ex["prompt_key"], len(prompts))))
    p, y, g = np.concatenate(preds), np.concatenate(labels), np.concatenate(groups)
    metrics = {}
    for j, name in enumerate(model.objectives):
        for k, v in objective_metrics(model.label_kinds[name], p[:, j], y[:, j], g).items():
            metrics[f"eval/{name}/{k}"] = float(v)
    print(baseline_table(metrics))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
