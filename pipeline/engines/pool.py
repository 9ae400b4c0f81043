"""Engines in Ray Data: `map_with_engine(ds, spec, model_dir, fn, ...)` runs
`fn(engine, batch, **kwargs)` over an actor pool in which every actor starts one
engine once and reuses it for every batch it is given."""

from __future__ import annotations

import atexit
import os
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import EngineConfig


def make_engine(spec: EngineConfig, model_dir: str):
    if spec.kind == "vllm":
        from pipeline.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, dtype=spec.dtype, max_model_len=spec.max_model_len, engine_args=spec.engine_args)
    if spec.kind == "transformers":
        from pipeline.engines.hf_engine import TransformersEngine

        return TransformersEngine(model_dir, spec.dtype, batch_size=spec.batch_size)
    from pipeline.objectives.judges import import_callable

    return import_callable(spec.target)(model_dir, **spec.options)


class EngineUDF:
    """A Ray Data actor-pool UDF: one engine per actor, built in the constructor."""

    def __init__(self, spec: dict, model_dir: str, fn: Callable, fn_kwargs: dict):
        spec = EngineConfig.model_validate(spec)
        os.environ.update(spec.env)
        self.engine = make_engine(spec, model_dir)
        self.fn, self.kwargs = fn, fn_kwargs
        # The engine's processes and shared memory go when the actor exits. Not in __del__: Ray Data
        # ends a finished pool's actors without deleting the UDF (measured with Ray 2.60: no __del__ ran,
        # and each engine left vLLM's 160 MiB /dev/shm segment behind); the actor's interpreter exit does run
        # atexit handlers (tests/test_rollout.py checks that no segment is left).
        if hasattr(self.engine, "shutdown"):
            atexit.register(self.engine.shutdown)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(self.engine, batch, **self.kwargs)


def map_with_engine(ds, spec: EngineConfig, model_dir: str, fn: Callable, **fn_kwargs: Any):
    return ds.map_batches(
        EngineUDF,
        fn_constructor_kwargs={"spec": spec.model_dump(), "model_dir": model_dir, "fn": fn, "fn_kwargs": fn_kwargs},
        batch_size=spec.batch_size, batch_format="pyarrow", concurrency=spec.num_engines,
        num_cpus=spec.num_cpus, num_gpus=spec.num_gpus or None,
    )
