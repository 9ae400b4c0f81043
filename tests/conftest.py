"""One Ray instance per test session; tiny models built locally; no hub access."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import glob  # noqa: E402

import pytest  # noqa: E402


def _mapped_shm() -> set[str]:
    """/dev/shm files some live process still maps or holds open (another test session's engine)."""
    live = set()
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/maps") as f:
                live.update(line.split(maxsplit=5)[-1].strip() for line in f if "/dev/shm/" in line)
            live.update(os.readlink(fd) for fd in glob.glob(f"{proc}/fd/*") if "/dev/shm/" in os.readlink(fd))
        except OSError:  # the process ended, or is not ours to read
            continue
    return live


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory():
    """vLLM engines killed with their Ray actors leave /dev/shm/psm_* segments; remove the ones this
    session left behind, never one a live process (another session on the machine) still uses."""
    before = set(glob.glob("/dev/shm/psm_*")) | set(glob.glob("/dev/shm/sem.mp-*"))
    yield
    new = (set(glob.glob("/dev/shm/psm_*")) | set(glob.glob("/dev/shm/sem.mp-*"))) - before
    for f in new - _mapped_shm():
        try:
            os.remove(f)
        except OSError:
            pass


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

    # tests/ on the workers' path, for the fake policy of the labelling tests (tests/fakes.py).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    init_ray(RayConfig(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}}))
    yield ray
    ray.shutdown()


CPU_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
CPU_ENGINE = {"kind": "vllm", "dtype": "auto", "max_model_len": 1024,
              "engine_args": {"kv_cache_memory_bytes": 128 << 20, "enable_chunked_prefill": False}, "env": CPU_VLLM_ENV}


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir):
    """One in-process vLLM engine (vllm-cpu) on the tiny model for the whole session."""
    os.environ.update(CPU_VLLM_ENV)
    from pipeline.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, dtype="auto", max_model_len=1024,
                        engine_args=CPU_ENGINE["engine_args"])
    yield engine
    engine.shutdown()


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}],
             "completion": f"{i} + {i + 1} = {2 * i + 1}. The answer is \\boxed{{{2 * i + 1}}}."}
            for i in range(offset, offset + n)]


@pytest.fixture(scope="session")
def steerable_policy(tmp_path_factory, tiny_model_dir):
    """A two-head policy (accuracy, engagement) built so head 0 always prefers token A and head 1
    token B: every embedding carries 10 on dimension 0, so the final hidden state's dimension 0 is
    ~11 at every position, and each head gets +5 on that dimension for its own token.
    -> (checkpoint dir, A's text, B's text)."""
    import torch

    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy, load_checked

    tok = load_tokenizer(tiny_model_dir)
    a, b = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", " there"))
    base = load_checked(tiny_model_dir)
    with torch.no_grad():
        base.get_input_embeddings().weight[:, 0] = 10.0
    policy = MultiHeadPolicy(base, ["accuracy", "engagement"], noise_std=0.0)
    with torch.no_grad():
        policy.heads[0, a, 0] += 5.0
        policy.heads[1, b, 0] += 5.0
    out = tmp_path_factory.mktemp("steerable") / "policy"
    policy.save(out, tok)
    return str(out), tok.decode([a]), tok.decode([b])


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (tests/test_gpu.py; run them with `pytest -m gpu`) skip, saying why, where
    torch sees no CUDA device. torch is imported only when such a test was collected."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    why = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False (no CUDA device or a CPU build "
                                  f"of torch {torch.__version__}); run on a GPU machine with `pytest -m gpu`")
    for item in gpu_items:
        item.add_marker(why)
