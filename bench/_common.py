"""Plumbing shared by the benchmarks: child processes (each side's own peak memory), the TRL venv."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Run by .venv-trl's python with the job's arguments as JSON in argv[1]; the body sets `trainer`.
TRL_PREAMBLE = r'''
import json, os, sys, time
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
a = json.loads(sys.argv[1]); rows = json.load(open(a["data"]))
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a["model_dir"])
if tok.pad_token is None: tok.pad_token = tok.eos_token
times = []
class StepTimer(TrainerCallback):
    def on_step_begin(self, *args, **kw): self.t0 = time.perf_counter()
    def on_step_end(self, *args, **kw): times.append(time.perf_counter() - self.t0)
common = dict(output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"], max_length=a["max_length"],
              learning_rate=a["lr"], bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
              logging_steps=1000, use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant", seed=0)
'''
TRL_EPILOGUE = '\ntrainer.train()\nprint("RESULT " + json.dumps({"times": times}))\n'


def result_line(stdout: str, stderr: str, what: str) -> dict:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{what} failed:\n{stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run_trl(body: str, rows: list[dict], args: dict) -> dict:
    """Run a TRL trainer in .venv-trl on `rows`; -> {"times": [...], "peak_rss_mb": ...}."""
    import tempfile

    py = os.path.join(ROOT, ".venv-trl", "bin", "python")
    if not os.path.exists(py):
        sys.exit("the TRL baseline needs .venv-trl: run bench/setup_trl.sh")
    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    with open(os.path.join(tmp, "data.json"), "w") as f:
        json.dump(rows, f)
    out = subprocess.run([py, "-c", TRL_PREAMBLE + body + TRL_EPILOGUE, json.dumps({**args, "data": f.name, "out": tmp})],
                         capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    r = result_line(out.stdout, out.stderr, "TRL side")
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return r


def run_side(script: str, side: str, args) -> dict:
    """Run `script --side SIDE` with the same arguments in a fresh process; -> its RESULT."""
    cmd = [sys.executable, script, "--side", side] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                      if k not in ("side", "no_trl") and v is not None]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return result_line(out.stdout, out.stderr, side)


def report_child(result: dict) -> None:
    """In a child: add this process's peak RSS (unless measured already) and print the result."""
    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def train_steps(spec, model, batches, lr: float) -> list[float]:
    """Plain torch loop over pre-collated batches with fused AdamW (as the harness, and as TRL's
    Trainer by default); seconds per optimizer step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss, _ = spec.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times
