"""Experiment trackers on rank 0: TensorBoard (torch's SummaryWriter), MLflow and
Weights & Biases through Ray's own integrations (`setup_mlflow`, `setup_wandb`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TrackerConfig


PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_tracker(cfg: TrackerConfig) -> None:
    """Fail before training starts, not on the workers mid-run, if the tracker's package is missing."""
    import importlib.util

    pkg = PACKAGES.get(cfg.kind)
    if pkg and importlib.util.find_spec(pkg) is None:
        raise ModuleNotFoundError(f"train.tracker.kind is {cfg.kind!r} but the {pkg} package is not installed: pip install {pkg}")


class Tracker:
    def __init__(self, cfg: TrackerConfig, run_name: str, log_dir: str, params: dict, resume_step: int = 0):
        self.kind, self._impl = cfg.kind, None
        if cfg.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            # a resumed run redoes the steps after its checkpoint: TensorBoard drops their earlier events
            # (MLflow and W&B keep both points of a redone step)
            self._impl = SummaryWriter(log_dir=log_dir, purge_step=resume_step + 1 if resume_step else None)
        elif cfg.kind == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            self._impl = setup_mlflow(params, tracking_uri=cfg.uri, experiment_name=cfg.project or run_name,
                                      run_name=run_name, create_experiment_if_not_exists=True)
        elif cfg.kind == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            self._impl = setup_wandb(params, project=cfg.project or "mahalo", name=run_name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._impl is None:
            return
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self._impl.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            self._impl.log_metrics(metrics, step=step)
        elif self.kind == "wandb":
            self._impl.log(metrics, step=step)

    def close(self) -> None:
        if self._impl is None:
            return
        if self.kind == "tensorboard":
            self._impl.close()
        elif self.kind == "mlflow":
            self._impl.end_run()
        elif self.kind == "wandb":
            self._impl.finish()
