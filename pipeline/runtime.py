"""Ray start-up shared by every job: one place that decides the runtime environment.

Precedence for environment variables: the user's (the runtime env given to `ray job
submit`, then config `ray.runtime_env.env_vars`, then the launching shell's) over ours.
Ours only fill gaps. Inside a Ray job, Ray refuses a driver runtime env that sets a
field or variable the job's runtime env already sets; those are left to the job's.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.config import RayConfig

log = logging.getLogger(__name__)

# Shell variables forwarded to Ray workers when set (the user's values win over defaults).
FORWARDED = ("HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "MAHALO_CACHE", "TORCH_EXTENSIONS_DIR",
             "WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI", "VLLM_CPU_KVCACHE_SPACE",
             "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS",
             "MAHALO_PROGRESS_FILE")  # pipeline.progress: workers report into the driver's progress file


def default_env() -> dict[str, str]:
    return {
        # DeepSpeed JIT-builds a CPU comm op; keep the build per venv so venvs don't rebuild each other's.
        "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, ".torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        # transformers' and the hub's tqdm bars ("Loading weights" per model load): in a worker they are
        # forwarded to the driver as walls of redraws; read at import, so no import is needed here
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


# Framework loggers whose warnings repeat without telling the user anything, quietened in every Ray worker.
# Ray Train's placement-group cleaner asks the State API once a second whether the controller lives; a
# local Ray without the dashboard has no State API, so each check logged a warning (825 lines in one main job).
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook (runs in each worker process at start): quieten QUIET_LOGGERS, and
    name this job's cluster in RAY_ADDRESS. Ray Train's placement-group cleaner queries the state API
    without an address; with another Ray on the machine (a second job, a test session) it failed with
    "Found multiple active Ray instances" on every poll."""
    import logging

    import ray

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "RAY_ADDRESS" not in os.environ and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def runtime_env(cfg: RayConfig) -> dict:
    env = default_env()
    env.update({k: os.environ[k] for k in FORWARDED if k in os.environ})
    user = dict(cfg.runtime_env)
    env.update({k: str(v) for k, v in (user.pop("env_vars", None) or {}).items()})
    return {"worker_process_setup_hook": "pipeline.runtime.setup_worker", **user, "env_vars": env}


def job_runtime_env() -> dict:
    """The runtime env this driver's Ray job was submitted with ({} outside a job)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def without_job_keys(renv: dict, job: dict) -> dict:
    """Drop what the job's runtime env sets already: the submitter's values win, and Ray raises on overlaps."""
    job_vars = job.get("env_vars") or {}
    out = {k: v for k, v in renv.items() if k != "env_vars" and k not in job}
    out["env_vars"] = {k: v for k, v in renv.get("env_vars", {}).items() if k not in job_vars}
    return out


def init_ray(cfg: RayConfig | None = None) -> None:
    """Start or join Ray. Local Ray gets more logical CPUs than cores (Ray Data + Train deadlock trap)."""
    import ray
    import ray.data

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    renv = without_job_keys(runtime_env(cfg), job_runtime_env())
    # The driver process reads the same variables (e.g. TORCH_EXTENSIONS_DIR for its own imports).
    for k, v in renv["env_vars"].items():
        os.environ.setdefault(k, v)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=renv, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1)), runtime_env=renv,
                 include_dashboard=False, log_to_driver=True)
    # Live progress bars only on a terminal; in job logs they turn into walls of redraws.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    log.info("ray %s: %s", "joined" if address else "started locally", ray.cluster_resources())
