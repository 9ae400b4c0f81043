"""Command-line plumbing shared by the jobs: `--config FILE` plus dotted overrides."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from pipeline.config import ConfigError, dump_config, load_config

C = TypeVar("C", bound=BaseModel)
CONFIGS = Path(__file__).parent / "configs"


def parse_job_args(cls: type[C], default_config: str | None, argv: list[str] | None = None) -> C:
    """`[--config FILE] [--key value | --key=value ...]` -> a validated config; exits 2 on a bad one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = str(CONFIGS / default_config) if default_config else None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            sys.exit("error: --config needs a file")
        path = argv[i + 1]
        del argv[i : i + 2]
    elif any(a.startswith("--config=") for a in argv):
        a = next(a for a in argv if a.startswith("--config="))
        path = a.split("=", 1)[1]
        argv.remove(a)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m {cls.__module__} [--config FILE] [--section.key VALUE ...]\n\n"
              f"default config: {path}\nkeys: see {cls.__name__} in pipeline/config.py")
        sys.exit(0)
    try:
        return load_config(cls, path, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("MAHALO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def start_job(cls: type[C], default_config: str | None, argv: list[str] | None, out_dir_field: str,
              with_ray: bool = True) -> C:
    """The common start of a stage job: logging, config (exits 2 on a bad one), the resolved
    config written to <out_dir>/config.yaml, then Ray."""
    setup_logging()
    cfg = parse_job_args(cls, default_config, argv)
    dump_config(cfg, Path(getattr(cfg, out_dir_field)) / "config.yaml")
    if with_ray:
        from pipeline.runtime import init_ray

        init_ray(cfg.ray)
    return cfg
