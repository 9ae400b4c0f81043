"""Stages as Ray jobs, and the cluster definitions: manifests parse, declare what the configs ask for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_runtime_env_wins_and_never_conflicts(monkeypatch):
    """Inside a Ray job, what the submitter set is left to the job (Ray raises on overlapping keys)."""
    from pipeline.config import RayConfig
    from pipeline.runtime import job_runtime_env, runtime_env, without_job_keys

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}}))
    ours = runtime_env(RayConfig(runtime_env={"env_vars": {"MY_FLAG": "1"}, "working_dir": "."}))
    merged = without_job_keys(ours, job_runtime_env())
    assert "TOKENIZERS_PARALLELISM" not in merged["env_vars"] and merged["env_vars"]["MY_FLAG"] == "1"
    assert "working_dir" not in merged
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ours["env_vars"]["TOKENIZERS_PARALLELISM"] == "false" and job_runtime_env() == {}


def test_workers_quieten_the_placement_group_cleaner(ray_session):
    """Every Ray worker runs our setup hook: the State API poller's once-a-second warning is off, the
    rest of Ray's warnings are not."""
    import logging

    import ray

    from pipeline.runtime import QUIET_LOGGERS

    @ray.remote(num_cpus=0)
    def levels():
        return [logging.getLogger(n).getEffectiveLevel() for n in (*QUIET_LOGGERS, "ray.train")], \
            os.environ.get("RAY_ADDRESS")

    (*quiet, other), address = ray.get(levels.remote())
    assert all(level == logging.ERROR for level in quiet) and other < logging.ERROR
    # the job's own cluster, so the cleaner's address-less State API calls never see "multiple Ray instances"
    assert address == ray.get_runtime_context().gcs_address


@pytest.mark.slow
def test_stage_submitted_as_ray_job_with_token_auth(tmp_path):
    """A local head with token auth; `ray job submit --working-dir . -- python -m jobs.label_steps` with
    the same kind of config as a local run; the submitter's env var overrides one we default."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_labeling import write_inputs

    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                # the job's `python` is the cluster's: here this venv's, whether or not the shell activated it
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    gcs, dash = _port(), _port()
    tmp_ray = Path("/tmp") / f"rj{uuid.uuid4().hex[:6]}"  # short: unix socket paths have a length limit
    # Every port explicit: the test session's own Ray already holds the default agent ports.
    ports = [f"--{name}={_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                                 "object-manager-port", "ray-client-server-port")]
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={tmp_ray}", *ports],
                   env=env, check=True, capture_output=True)
    try:
        cfg = write_inputs(tmp_path, n_shards=2, per_shard=2)
        (tmp_path / "label.yaml").write_text(json.dumps(cfg))
        address = f"http://127.0.0.1:{dash}"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": "tests", "TOKENIZERS_PARALLELISM": "true",
                                                                 "HF_HUB_OFFLINE": "1"}}),
                  "--", "python", "-m", "jobs.label_steps", "--config", str(tmp_path / "label.yaml")]
        deadline = time.time() + 90  # the job agent comes up a little after `ray start` returns
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
            assert time.time() < deadline, "the job server did not come up"
            time.sleep(1)
        denied = subprocess.run(submit, env={**env, "RAY_AUTH_TOKEN": "wrong"}, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0  # a wrong token is refused
        for _ in range(20):  # the job agent may still be starting: Ray says "try again later"
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in r.stderr + r.stdout:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "label_steps: 2 shards written (4 rows)" in r.stdout
        from pipeline.data import read_records

        rows = read_records([str(tmp_path / "labels")], "stepwise")[0].to_pylist()
        assert len(rows) == 4 and {r["objective"] for r in rows} == {"math_word/accuracy"}
    finally:
        _stop_cluster(tmp_ray)


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only the cluster this test started: `ray stop` would kill every Ray on the machine,
    the test session's own included."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


# --- cluster definitions --------------------------------------------------------------------------

GPU_CONFIGS = {  # config file -> its job's config class
    "math_data.yaml": "PrepareDataConfig", "hv_data.yaml": "PrepareDataConfig",
    "math_sft.yaml": "SFTJobConfig", "math_rollout.yaml": "RolloutJobConfig", "math_label_steps.yaml": "LabelJobConfig",
    "math_fit_prm.yaml": "PRMJobConfig", "math_build_pairs.yaml": "PairsJobConfig", "hv_build_pairs.yaml": "PairsJobConfig",
    "math_fit_policy.yaml": "PolicyJobConfig", "hv_fit_policy.yaml": "PolicyJobConfig", "serve.yaml": "ServeConfig",
}


def _gpu_configs():
    import pipeline.config as C

    return {name: C.load_config(getattr(C, cls), str(ROOT / "jobs" / "configs" / "gpu" / name), [])
            for name, cls in GPU_CONFIGS.items()}


def test_every_gpu_config_validates_like_the_cpu_ones():
    files = {p.name for p in (ROOT / "jobs" / "configs" / "gpu").glob("*.yaml")}
    assert files == set(GPU_CONFIGS), files ^ set(GPU_CONFIGS)  # a new GPU config must be listed (and so validated)
    cfgs = _gpu_configs()
    for name, c in cfgs.items():
        train = getattr(c, "train", None)
        if train is not None:
            assert train.use_gpu and train.zero_stage == 3 and train.bf16, name
            assert train.storage_path.startswith("/mnt/shared"), name  # shared storage for every node
    # the paper's settings
    assert cfgs["math_fit_policy.yaml"].train.lr == 1e-6 and cfgs["hv_fit_policy.yaml"].train.lr == 5e-7
    assert all(cfgs[f].dpo.beta == 0.1 for f in ("math_fit_policy.yaml", "hv_fit_policy.yaml"))
    assert cfgs["hv_fit_policy.yaml"].objectives == ["helpfulness", "honesty", "truthfulness"]
    assert cfgs["math_sft.yaml"].model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfgs["hv_fit_policy.yaml"].model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    # cached reference log-probs must match the trainer's tokenisation
    for pairs, policy in (("math_build_pairs.yaml", "math_fit_policy.yaml"), ("hv_build_pairs.yaml", "hv_fit_policy.yaml")):
        a, b = cfgs[pairs].dpo, cfgs[policy].dpo
        assert (a.max_length, a.max_prompt_length) == (b.max_length, b.max_prompt_length), pairs


def _manifests():
    out = {}
    for p in sorted((ROOT / "cluster").rglob("*.yaml")):
        out[str(p.relative_to(ROOT))] = yaml.safe_load(p.read_text())
    return out


def _worker_gpus(spec: dict) -> tuple[int, int]:
    """(GPUs per worker pod, max pods) of the GPU worker group of a RayCluster spec."""
    (group,) = [g for g in spec["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    per_pod = int(group["rayStartParams"]["num-gpus"])
    (c,) = group["template"]["spec"]["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == per_pod
    return per_pod, int(group.get("maxReplicas", group["replicas"]))


def test_manifests_parse_and_declare_what_the_configs_ask_for():
    m = _manifests()
    assert {"cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml", "cluster/ray-up/aws.yaml",
            "cluster/runtime_env.yaml"} <= set(m)
    rc, rj, up = m["cluster/kuberay/raycluster.yaml"], m["cluster/kuberay/rayjob.yaml"], m["cluster/ray-up/aws.yaml"]
    assert rc["kind"] == "RayCluster" and rj["kind"] == "RayJob" and rc["apiVersion"] == rj["apiVersion"] == "ray.io/v1"
    for spec in (rc["spec"], rj["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == "2.60.0"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # a CPU head that schedules no work
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        envs = [{e["name"] for e in c.get("env", [])} for g in [head, *spec["workerGroupSpecs"]]
                for c in g["template"]["spec"]["containers"]]
        assert all({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= e for e in envs)  # token auth on every node
    # the RayJob's entrypoint is a stage with a GPU config that exists, and its cluster has the GPUs it asks for
    entry = rj["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.fit_policy"]
    cfgs = _gpu_configs()
    job_cfg = cfgs[Path(entry[entry.index("--config") + 1]).name]
    per_pod, pods = _worker_gpus(rj["spec"]["rayClusterSpec"])
    assert job_cfg.train.num_workers * job_cfg.train.resources_per_worker.get("GPU", 1) <= per_pod * pods
    # the RayCluster and the ray-up cluster hold the largest GPU ask of any config
    def ask(c):
        t = getattr(c, "train", None)
        e = getattr(c, "engine", None)
        return max(t.num_workers * t.resources_per_worker.get("GPU", 1) if t else 0,
                   e.num_engines * e.num_gpus if e else 0, getattr(c, "num_replicas", 0) * getattr(c, "num_gpus", 0))
    biggest = max(ask(c) for c in cfgs.values())
    per_pod, pods = _worker_gpus(rc["spec"])
    assert biggest <= per_pod * pods
    gpu_nodes = [t for t in up["available_node_types"].values() if t["resources"].get("GPU")]
    assert biggest <= max(t["resources"]["GPU"] * t["max_workers"] for t in gpu_nodes)
    assert up["available_node_types"][up["head_node_type"]]["resources"]["CPU"] == 0
    # every config's CPU ask per GPU worker fits a GPU node's CPUs
    for name, c in cfgs.items():
        t = getattr(c, "train", None)
        if t is not None:
            per_worker = t.resources_per_worker
            assert per_worker.get("CPU", 1) * min(per_pod, t.num_workers) <= 64, name
    assert (ROOT / "cluster" / "Dockerfile.gpu").read_text().count("[gpu]") == 1
