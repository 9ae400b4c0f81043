"""One Ray instance per test session; tiny models built locally; no hub access."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from pipeline.models.registry import tiny_model

    return str(tiny_model(seed=0))


@pytest.fixture(scope="session")
def ray_session():
    """Local Ray with 4 logical CPUs on 2 cores, so Ray Data never starves Ray Train workers."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime import init_ray

    init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}],
             "completion": f"{i} + {i + 1} = {2 * i + 1}. The answer is \\boxed{{{2 * i + 1}}}."}
            for i in range(offset, offset + n)]
