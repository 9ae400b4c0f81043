"""Built-in tasks, generated deterministically from a seed (the main job's embedded default)."""

from pathlib import Path

from pipeline.data.io import write_records
from pipeline.tasks import math_word


def write_builtin(out_dir: str | Path, n_train: int, n_eval: int, seed: int) -> dict[str, str]:
    """Write the built-in problems and SFT demonstrations as Parquet; returns the paths."""
    out = Path(out_dir)
    paths = {}
    for split, (problems, sft) in math_word.splits(n_train, n_eval, seed).items():
        paths[f"problems_{split}"] = write_records(problems, out / f"problems_{split}.parquet", "problem")
        paths[f"sft_{split}"] = write_records(sft, out / f"sft_{split}.parquet", "sft")
    return paths
