from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.common import CONFIGS, parse_job_args
from pipeline.config import (ConfigError, LabelJobConfig, MainJobConfig, RolloutJobConfig, SFTJobConfig, load_config,
                             parse_overrides)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "run_name: a\ntrain:\n  lr: 1.0e-4\n  zero_stage: 2\n")
    cfg = load_config(SFTJobConfig, p, ["--train.lr", "1e-5", "--train.zero_stage=3", "--data.paths", "[x.parquet, y.jsonl]"])
    assert cfg.run_name == "a"
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.train.zero_stage == 3
    assert cfg.data.paths == ["x.parquet", "y.jsonl"]
    assert cfg.train.micro_batch_size == 4  # default kept


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTJobConfig, p)
    assert str(p) in str(e.value) and "train.lrr" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  num_workers: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTJobConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "train.num_workers" in msg and "'two'" in msg


def test_bad_override_names_the_command_line(tmp_path):
    p = write(tmp_path, "run_name: a\n")
    with pytest.raises(ConfigError, match=r"command line \(--train\.zero_stage\): train\.zero_stage"):
        load_config(SFTJobConfig, p, ["--train.zero_stage", "5"])
    with pytest.raises(ConfigError, match=r"command line \(--trian\.lr\)"):
        load_config(SFTJobConfig, p, ["--trian.lr", "1e-5"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_cross_field_validation(tmp_path):
    p = write(tmp_path, "sft:\n  max_length: 64\n  max_prompt_length: 64\n")
    with pytest.raises(ConfigError, match="max_prompt_length must be below max_length"):
        load_config(SFTJobConfig, p)


def test_job_cli_exits_before_work(tmp_path, capsys):
    p = write(tmp_path, "train:\n  zero_stage: 7\n")
    with pytest.raises(SystemExit) as e:
        parse_job_args(SFTJobConfig, None, ["--config", str(p)])
    assert e.value.code == 2
    assert "train.zero_stage" in capsys.readouterr().err


@pytest.mark.parametrize("name,cls", [("sft.yaml", SFTJobConfig), ("main.yaml", MainJobConfig),
                                      ("main_quick.yaml", MainJobConfig), ("main_study.yaml", MainJobConfig),
                                      ("rollout.yaml", RolloutJobConfig), ("label_steps.yaml", LabelJobConfig)])
def test_shipped_configs_validate(name, cls):
    load_config(cls, CONFIGS / name)


@pytest.mark.parametrize("overrides, message", [
    (["--method", "modpo"], "needs modpo_weights"),
    (["--method", "modpo", "--modpo_weights", "{a: 0, b: 0}"], "not all zero"),
    (["--method", "modpo", "--modpo_weights", "{a: 1}", "--dpo.loss_type", "ipo"], "loss_type: sigmoid"),
    (["--method", "modpo", "--modpo_weights", "{c: 1}", "--objectives", "[a, b]"], r"\['c'\] not in objectives"),
    (["--modpo_weights", "{a: 1}"], "only used by method modpo"),
])
def test_modpo_settings_are_checked(overrides, message):
    from pipeline.config import PolicyJobConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PolicyJobConfig, None, overrides)


def test_a_misspelt_task_family_in_an_eval_filter_is_an_error_not_an_empty_evaluation():
    from pipeline.config import EvalPolicy, MainSizes

    assert MainSizes(single_eval_tasks=["assistant"]).single_eval_tasks == ["assistant"]
    with pytest.raises(ValidationError, match="unknown task family \\['asistant'\\]"):
        MainSizes(single_eval_tasks=["asistant"])
    with pytest.raises(ValidationError, match="unknown task family"):
        EvalPolicy(name="sft", kind="hf", path="x", tasks=["maths"])
