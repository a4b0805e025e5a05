"""Config loading: overrides, validation messages, path resolution; the CLI's --dry-run, --help, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_DIR, TINY_SFT, invoke_cli, run_cli, tiny_sft_dict, write_yaml
from rlhf_cli.config_loader import apply_override, load_config, parse_override
from stages.errors import ConfigError


# ----------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "item, parts, value",
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),  # YAML 1.1 would read "3e-4" as a string
        ("train.lr=1E5", ["train", "lr"], 1e5),
        ("train.max_steps=12", ["train", "max_steps"], 12),
        ("data.packing=true", ["data", "packing"], True),
        ("data.eval=null", ["data", "eval"], None),
        ("train.adam_betas=[0.9, 0.99]", ["train", "adam_betas"], [0.9, 0.99]),
        ("model.from_config={model_type: llama}", ["model", "from_config"], {"model_type": "llama"}),
        ("output_dir=a=b", ["output_dir"], "a=b"),  # only the first '=' splits
        ("seed=", ["seed"], ""),
    ],
)
def test_parse_override(item, parts, value):
    assert parse_override(item) == (parts, value)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1"])
def test_parse_override_rejects_malformed(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_apply_override_creates_and_replaces_nested_keys():
    data = {"train": {"lr": 1.0}}
    apply_override(data, ["train", "lr"], 2.0)
    apply_override(data, ["model", "from_config", "hidden_size"], 8)
    assert data == {"train": {"lr": 2.0}, "model": {"from_config": {"hidden_size": 8}}}
    with pytest.raises(ConfigError, match="train.lr is a float, not a mapping"):
        apply_override(data, ["train", "lr", "x"], 1)


# ----------------------------------------------------------------------------------------- validation
def _cfg_file(tmp_path: Path, **changes) -> Path:
    cfg = tiny_sft_dict(tmp_path)
    for dotted, value in changes.items():
        apply_override(cfg, dotted.split("__"), value)
    return write_yaml(tmp_path / "sft.yaml", cfg)


def test_yaml_below_overrides_below_nothing(tmp_path):
    path = _cfg_file(tmp_path, train__lr=0.5)
    assert load_config("sft", path).train.lr == 0.5
    assert load_config("sft", path, ["train.lr=0.25", "train.lr=0.125"]).train.lr == 0.125  # last wins
    assert load_config("sft", path).train.weight_decay == 0.01  # from the file
    assert load_config("sft", path).train.adam_eps == 1e-8  # schema default


def test_unknown_key_names_path_and_closest_key(tmp_path):
    path = _cfg_file(tmp_path, train__micro_bach_size=3)
    with pytest.raises(ConfigError) as exc:
        load_config("sft", path)
    assert "unknown key 'train.micro_bach_size'" in str(exc.value)
    assert "closest valid key: 'train.micro_batch_size'" in str(exc.value)
    assert exc.value.exit_code == 2


def test_unknown_key_that_is_another_sections_names_it_there(tmp_path):
    """`train.log_every` is logging's key: said so, rather than the near name train.eval_every; at the top
    level too, and for a key some PPO sections share (every one named)."""
    with pytest.raises(ConfigError, match="unknown key 'train.log_every'; it is a key of another section: "
                                          r"'logging.log_every' \(valid here"):
        load_config("sft", _cfg_file(tmp_path), ["train.log_every=0"])
    with pytest.raises(ConfigError, match="unknown key 'max_steps'; it is a key of another section: 'train.max_steps'"):
        load_config("sft", _cfg_file(tmp_path), ["max_steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'ppo.max_kl'; it is a key of another section: 'monitor.max_kl'"):
        load_config("ppo", REPO / "configs" / "tiny" / "ppo.yaml", ["ppo.max_kl=0.2"])


def test_unknown_key_named_as_other_tools_name_it_gets_ours(tmp_path):
    """A key under its HF Trainer / TRL / OpenRLHF name gets this tool's, per command (learning_rate is train.lr
    for SFT, train.policy_lr for PPO; PPO's bare lr is either learning rate); a command without the key gets no
    such hint (SFT has no reward model)."""
    ppo = REPO / "configs" / "tiny" / "ppo.yaml"
    for stage, path, given, ours in (
            ("sft", _cfg_file(tmp_path), "train.learning_rate=1e-4", "'train.lr'"),
            ("sft", _cfg_file(tmp_path), "train.max_grad_norm=1", "'train.gradient_clipping'"),
            ("sft", _cfg_file(tmp_path), "train.per_device_train_batch_size=4", "'train.micro_batch_size'"),
            ("sft", _cfg_file(tmp_path), "bf16=true", "'deepspeed.precision: bf16'"),
            ("ppo", ppo, "train.learning_rate=1e-4", "'train.policy_lr' or 'train.critic_lr'"),  # (TRL's: both)
            ("ppo", ppo, "train.actor_learning_rate=1e-4", "'train.policy_lr'"),
            ("bench", REPO / "configs" / "bench" / "tiny.yaml", "workload.response_length=8", "'workload.new_tokens'"),
            ("ppo", ppo, "train.lr=1e-4", "'train.policy_lr' or 'train.critic_lr'"),
            ("ppo", ppo, "ppo.cliprange=0.2", "'ppo.policy_clip'"),
            ("ppo", ppo, "train.max_epochs=2", "'ppo.ppo_epochs'"),
            ("ppo", ppo, "reward_pretrain=x", "'reward_model.name_or_path'")):
        with pytest.raises(ConfigError) as exc:
            load_config(stage, path, [given])
        assert f"unknown key '{given.split('=')[0]}'; rlhf calls it {ours} (valid here: " in str(exc.value), given
    for stage, path, given in (("sft", _cfg_file(tmp_path), "reward_pretrain=x"),
                               ("ppo", ppo, "train.num_train_epochs=2")):  # (TRL's passes over the prompts)
        with pytest.raises(ConfigError) as exc:
            load_config(stage, path, [given])
        assert f"unknown key '{given.split('=')[0]}' (valid here" in str(exc.value), str(exc.value)


def test_closest_key_prefers_one_sharing_its_words(tmp_path):
    """`lr_rate` is closest to lr (its words contain lr's), not to the longer look-alike min_lr_ratio;
    `micro_batch` to micro_batch_size, not eval_micro_batch_size."""
    for given, close in (("train.lr_rate", "train.lr"), ("train.micro_batch", "train.micro_batch_size"),
                         ("train.batch_size", "train.micro_batch_size")):
        with pytest.raises(ConfigError) as exc:
            load_config("sft", _cfg_file(tmp_path), [f"{given}=1"])
        assert f"unknown key '{given}'; closest valid key: '{close}' (valid" in str(exc.value)
    # a far key is no hint: one shared word of three (reward_model_path: model), a section (a pipeline's
    # eval_steps: eval), a ratio under 0.4 (ppo.steps: critic_pretrain_steps)
    pipeline = REPO / "configs" / "tiny" / "pipeline.yaml"
    for stage, path, given in (("sft", _cfg_file(tmp_path), "reward_model_path"),
                               ("sft", _cfg_file(tmp_path), "data.eval_batch_size"),
                               ("pipeline", pipeline, "eval_steps"),
                               ("ppo", REPO / "configs" / "tiny" / "ppo.yaml", "ppo.steps")):
        with pytest.raises(ConfigError) as exc:
            load_config(stage, path, [f"{given}=1"])
        assert f"unknown key '{given}' (valid here" in str(exc.value), str(exc.value)


def test_unknown_section_given_with_set_is_marked(tmp_path):
    """`--set trian.lr=1` makes the unknown section `trian`: its line says it came from the command line."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["trian.lr=1"])
    assert "unknown key 'trian'; closest valid key: 'train'" in str(exc.value)
    assert str(exc.value).endswith("[given with --set]")


def test_from_config_refusal_given_with_set_is_marked(tmp_path):
    """The config class's refusal of a from_config value set with --set (a check of the model section) is
    marked as given there, and quotes transformers' reason without its wrapping."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["model.from_config.hidden_size=30"])
    assert str(exc.value).endswith("model: from_config: llama rejects it: The hidden size (30) is not a multiple "
                                   "of the number of attention heads (4). [given with --set]"), str(exc.value)
    # transformers writes num_attention_heads as "the number of attention heads": marked too
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["model.from_config.num_attention_heads=7"])
    assert str(exc.value).endswith("number of attention heads (7). [given with --set]"), str(exc.value)
    # the bad value from the file, another from_config key given with --set: no mark
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path, model__from_config__hidden_size=30),
                    ["model.from_config.num_hidden_layers=1"])
    assert str(exc.value).endswith("attention heads (4)."), str(exc.value)


def test_the_architecture_is_checked_once_the_rest_of_the_config_is_valid(tmp_path):
    """A from_config architecture is checked against transformers' config class (which imports transformers and
    torch: seconds) only once everything else validates, so a typo elsewhere is said first, and alone; a refused
    architecture gets no "a valid config of another command" hint (train-rm's schema takes an SFT file's keys,
    and would have refused the same architecture)."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["model.from_config.hiden_size=30", "train.bogus=1"])
    assert "unknown key 'train.bogus'" in str(exc.value) and "hiden_size" not in str(exc.value), str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["model.from_config.hiden_size=30"])
    assert str(exc.value).endswith("model: from_config.hiden_size: not a llama config key; closest valid key: "
                                   "from_config.hidden_size [given with --set]"), str(exc.value)
    # architecture=False (the pipeline's first pass over its stages): everything else checked, that left for later
    cfg = load_config("sft", _cfg_file(tmp_path), ["model.from_config.hiden_size=30"], architecture=False)
    assert cfg.model.from_config["hiden_size"] == 30


def test_unknown_top_level_key(tmp_path):
    path = _cfg_file(tmp_path, modle={"x": 1})
    with pytest.raises(ConfigError, match="unknown key 'modle'; closest valid key: 'model'"):
        load_config("sft", path)


def test_wrong_type_names_path_and_expectation(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["train.micro_batch_size=many"])
    msg = str(exc.value)
    assert "train.micro_batch_size" in msg and "valid integer" in msg and "'many'" in msg
    assert msg.endswith("(got 'many') [given with --set]")  # the file does not hold that value
    with pytest.raises(ConfigError) as exc:  # a key inside a section given whole with --set
        load_config("sft", _cfg_file(tmp_path), ["train={lrr: 1}"])
    assert "unknown key 'train.lrr'" in str(exc.value) and str(exc.value).endswith("[given with --set]")
    with pytest.raises(ConfigError) as exc:  # from the file: no such mark
        load_config("sft", _cfg_file(tmp_path, train__micro_batch_size="many"))
    assert "[given with --set]" not in str(exc.value)


def test_an_unknown_key_in_the_file_is_not_marked_as_given_with_set(tmp_path):
    """The valid keys an unknown key's message lists may include one given with --set; that does not make the
    unknown key a command-line one."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path, loss={"lm_coef": 0.0}), [f"output_dir={tmp_path / 'o'}"])
    assert str(exc.value).splitlines()[0].endswith("unknown key 'loss' (valid here: seed, output_dir, model, train, "
                                                   "deepspeed, logging, data)"), str(exc.value)


def test_a_config_of_another_command_says_which(tmp_path):
    tiny = REPO / "configs" / "tiny"
    for command, path, meant in (("sft", tiny / "rm.yaml", "train-rm"), ("sft", tiny / "ppo.yaml", "ppo"),
                                 ("ppo", tiny / "sft.yaml", "sft"), ("train-rm", tiny / "pipeline.yaml", "pipeline")):
        with pytest.raises(ConfigError) as exc:
            load_config(command, path)
        assert str(exc.value).endswith(f"\n  (the file is a valid `rlhf {meant}` config: is that the command you "
                                       "meant?)"), (command, path, str(exc.value))
    with pytest.raises(ConfigError) as exc:  # a plain mistake in a config of the right kind: no such line
        load_config("sft", _cfg_file(tmp_path, train__lrr=1))
    assert "the file is a valid" not in str(exc.value)


def test_wrong_value_names_allowed_choices(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["train.lr_scheduler=exp"])
    assert "train.lr_scheduler" in str(exc.value) and "'cosine'" in str(exc.value)


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="offload_param needs zero_stage: 3"):
        load_config("sft", _cfg_file(tmp_path), ["deepspeed.zero_stage=2", "deepspeed.offload_param=true"])
    with pytest.raises(ConfigError, match="max_prompt_length .* must be smaller than max_length"):
        load_config("sft", _cfg_file(tmp_path), ["data.max_prompt_length=200", "data.max_length=100"])
    with pytest.raises(ConfigError, match="exactly one of name_or_path"):
        load_config("sft", _cfg_file(tmp_path), ["model.name_or_path=gpt2"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: Input should be greater than or equal to 1"):
        load_config("sft", _cfg_file(tmp_path), ["train.micro_batch_size=0"])


def test_missing_data_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train\.path: path does not exist: .*nope\.jsonl \[given with --set\]$"):
        load_config("sft", _cfg_file(tmp_path), ["data.train=nope.jsonl"])
    # `--set output_dir=$DIR` with DIR unset: not the current folder
    for key in ("output_dir", "data.train"):
        with pytest.raises(ConfigError, match=rf"{key}(\.path)?: empty path \[given with --set\]$"):
            load_config("sft", _cfg_file(tmp_path), [f"{key}="])
    # a bad path in the file itself is not marked
    cfg = yaml.safe_load(_cfg_file(tmp_path).read_text())
    cfg["data"]["train"] = str(tmp_path / "gone.jsonl")
    with pytest.raises(ConfigError, match=r"data\.train\.path: path does not exist: .*gone\.jsonl$"):
        load_config("sft", write_yaml(tmp_path / "bad.yaml", cfg), [])


def test_a_local_data_path_the_run_cannot_read_is_a_config_error(tmp_path, monkeypatch):
    """A folder, a .gz or a suffix-less file as data: exit 2 naming the key (and the list item), as a missing
    file is, not a data error once the run reads it; any case of a known suffix is read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for name in ("d.jsonl.gz", "rows", "d.JSONL"):
        (tmp_path / name).write_text('{"prompt": "hi", "response": "yo"}\n')
    for value, what in (("folder", "a folder"), ("d.jsonl.gz", "a .gz file"), ("rows", "a file without a suffix")):
        with pytest.raises(ConfigError, match=rf"^data\.train\.path: {tmp_path / value} is {what}; local data must "
                                              r"be \.jsonl, \.json, \.parquet, \.csv file\(s\).*\[given with --set\]$"):
            load_config("sft", _cfg_file(tmp_path), [f"data.train={value}"])
    with pytest.raises(ConfigError, match=r"^data\.eval\.path\[1\]: .*/folder is a folder"):
        load_config("sft", _cfg_file(tmp_path), ["data.eval=[d.JSONL, folder]"])
    assert load_config("sft", _cfg_file(tmp_path), ["data.train=d.JSONL"]).data.train.path == str(tmp_path / "d.JSONL")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sft", Path("/nonexistent/sft.yaml"))
    with pytest.raises(ConfigError, match=r"config file .* is a directory \(give the YAML file in it\)"):
        load_config("sft", REPO / "configs" / "tiny")


def test_relative_paths_resolve_against_config_folder_and_cli_against_cwd(tmp_path):
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "d.jsonl").write_text("{}\n")
    cfg = tiny_sft_dict(tmp_path)
    cfg["output_dir"] = "runs/x"
    cfg["data"]["train"] = "d.jsonl"
    path = write_yaml(folder / "sft.yaml", cfg)
    loaded = load_config("sft", path, cwd=tmp_path)
    assert loaded.output_dir == str(folder / "runs" / "x")
    assert loaded.data.train.path == str(folder / "d.jsonl")
    from_cli = load_config("sft", path, ["output_dir=elsewhere"], cwd=tmp_path)
    assert from_cli.output_dir == str(tmp_path / "elsewhere")


def test_hub_ids_are_left_alone(tmp_path):
    cfg = load_config("sft", _cfg_file(tmp_path), ["model.from_config=null", "model.name_or_path=Qwen/Qwen2.5-0.5B"])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"


def test_a_path_typo_is_no_hub_id_and_offline_a_hub_id_must_be_cached(tmp_path, monkeypatch):
    """A hub id is OWNER/NAME: `runs/demo/sfft` can only be a path (exit 2, missing); `outputs/sft` could be a
    hub id, so offline it must be in the hub cache, which is checked before any launch."""
    import huggingface_hub.constants

    from stages.models import uncached_hub_model

    with pytest.raises(ConfigError, match="model.name_or_path: path does not exist: .*runs/demo/sfft"):
        load_config("sft", _cfg_file(tmp_path), ["model.from_config=null", "model.name_or_path=runs/demo/sfft"])
    from stages.errors import CheckpointError
    from stages.model_paths import resolve_model_dir

    for path in ("outputs/sft/", "my model", "sft.json", ".hidden"):  # no NAME or OWNER/NAME: one rule for both
        with pytest.raises(ConfigError, match="model.name_or_path: path does not exist"):
            load_config("sft", _cfg_file(tmp_path), ["model.from_config=null", f"model.name_or_path={path}"])
        with pytest.raises(CheckpointError, match=f"model {path}: no such file or directory"):
            resolve_model_dir(path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert uncached_hub_model("Qwen/Qwen2.5-0.5B", "model.name_or_path") is None  # in the cache
    assert uncached_hub_model("outputs/sft--lr3e-5", "model.name_or_path").startswith(  # no repo id to the hub
        "model.name_or_path outputs/sft--lr3e-5: no such local folder")
    assert uncached_hub_model("outputs/sft", "reward_model.name_or_path").startswith(
        "reward_model.name_or_path outputs/sft: no such local folder, and no hub model of that name in the local "
        "cache (HF_HUB_OFFLINE=1")
    args = ("sft", "--config", str(TINY_SFT), "--set", "model.from_config=null", "--set",
            "model.name_or_path=outputs/sft", "--set", f"output_dir={tmp_path / 'out'}")
    dry = invoke_cli(*args, "--dry-run")  # the dry run warns; the run stops before writing or launching (exit 2)
    assert dry.exit_code == 0 and "outputs/sft: no such local folder" in dry.output and "(a run would stop here)" in dry.output
    run = invoke_cli(*args)
    assert run.exit_code == 2 and "model.name_or_path outputs/sft: no such local folder" in run.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the hub answers when the model loads
    assert uncached_hub_model("outputs/sft", "reward_model.name_or_path") is None


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml line 2, column 1: invalid YAML: expected ',' or ']'") as exc:
        load_config("sft", path)
    assert "<unicode string>" not in str(exc.value)  # (PyYAML's own text names no file)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: the first train: block's lr would be lost. Ours
    refuses, naming the key and both lines; a `<<:` merge's keys may still be overridden."""
    path = _cfg_file(tmp_path)
    text = path.read_text() + "train:\n  micro_batch_size: 2\n"
    path.write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    last = len(text.splitlines()) - 1
    with pytest.raises(ConfigError, match=rf"sft.yaml line {last}, column 1: invalid YAML: key 'train' given twice "
                                          rf"\(first on line {first}\); keep one \(while reading a mapping from line 1\)"):
        load_config("sft", path)
    from rlhf_cli.config_loader import parse_yaml

    assert parse_yaml("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n", "s")["x"] == {"a": 3, "b": 2}
    with pytest.raises(ConfigError, match="--set train line 1, column 9: invalid YAML: key 'lr' given twice"):
        parse_override("train={lr: 1, lr: 2}")


def test_a_string_that_reads_as_a_float_survives_the_resolved_config(tmp_path):
    """`split: '1e3'` is a string; written into resolved_config.yaml (which every launched worker reads) it is
    quoted, so the worker reads a string again rather than our loader's float 1000.0."""
    from rlhf_cli.config_loader import dump_config

    cfg = load_config("sft", _cfg_file(tmp_path, data__train="org/dataset"), ["data.train.split='1e3'", "train.lr=1e-5"])
    assert cfg.data.train.split == "1e3"
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    again = load_config("sft", tmp_path / "resolved.yaml")
    assert again.data.train.split == "1e3" and again.train.lr == 1e-5 and again == cfg


# ----------------------------------------------------------------------------------------- CLI
def test_cli_bogus_key_exits_2_with_key_named():
    res = run_cli("sft", "--config", str(TINY_SFT), "--set", "train.bogus=1")
    assert res.returncode == 2, res.stderr
    assert "train.bogus" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_dry_run_prints_config_and_launch_command(tmp_path):
    import torch

    out_dir = tmp_path / "never"
    res = run_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--num-gpus", "2", "--set", f"output_dir={out_dir}",
                  "--set", "train.lr=0.125", drop_env=("DS_ACCELERATOR",))
    assert res.returncode == 0, res.stderr
    # DeepSpeed, imported for the checks, gets the workers' accelerator rather than guessing it with a warning,
    # which the launch command still sets
    assert "real_accelerator" not in res.stdout + res.stderr, res.stderr
    assert ("DS_ACCELERATOR=cpu" in res.stdout) != torch.cuda.is_available()
    assert "lr: 0.125" in res.stdout
    assert f"output_dir: {out_dir}" in res.stdout
    assert "-m deepspeed.launcher.runner --num_gpus 2" in res.stdout
    assert "PYTHON_RLHF_LAUNCHED" not in res.stdout  # a copy run by hand must lock and prepare output_dir itself
    # one node: the runner's "Unable to find hostfile" warning is left out (its errors still show)
    assert f"--log_level error --no_local_rank --module rlhf_cli sft --config {out_dir}/resolved_config.yaml" in res.stdout
    assert not out_dir.exists()  # a dry run writes nothing


def test_check_data_reads_every_row_names_a_bad_one_and_writes_nothing(tmp_path):
    """`--check-data` (a dry run that reads the data): a broken row 3 of 41 stops it, named by file and row, as
    the run would stop; with data.on_bad_row: skip it prints the run's report (40 good rows: 38 train + 2 held out,
    the skipped row by reason: hand-counted) and the step plan for the ranks asked (--num-gpus 2: 38 rows make
    one global batch of 2 x 16 per epoch, 3 epochs); the tokenizer the run would train is trained in memory and
    no output folder appears."""
    rows = (TINY_SFT.parent / "data" / "sft.jsonl").read_text().splitlines(keepends=True)[:40]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(rows[:2]) + '{"messages": [\n' + "".join(rows[2:]))
    out = tmp_path / "never"

    def check(*args: str):
        return invoke_cli("sft", "-c", str(TINY_SFT), "--check-data", "--set", f"data.train={data}",
                          "--set", f"output_dir={out}", *args)

    res = check()
    assert res.exit_code == 1 and f"{data} row 3: invalid JSON" in res.stderr, res.output
    assert "data.on_bad_row: skip" in res.stderr and not out.exists()
    res = check("--set", "data.on_bad_row=skip", "--num-gpus", "2")
    assert res.exit_code == 0, res.output
    assert "train data: 38 examples;" in res.stdout and "eval data: 2 examples;" in res.stdout, res.stdout
    assert "skipped 1 bad row(s) (invalid JSON: 1)" in res.stdout
    assert "steps: 3 optimizer steps of 32 rows (1 per epoch over 38 rows, 2 rank(s); each epoch leaves out 6 " \
        "rows past its last full batch)" in res.stdout
    assert "warning: 6 of 38 training rows (16%) are left out of each epoch" in " ".join(res.stdout.split())
    assert res.stdout.rstrip().endswith("dry run: nothing trained") and not out.exists()
    res = check("--set", "data.on_bad_row=skip", "--num-gpus", "3")  # 38 rows < one global batch of 48
    assert res.exit_code == 1 and "38 training rows is fewer than one global batch of 48" in res.stderr


def test_dry_run_under_another_launcher_is_refused_not_trained(tmp_path, monkeypatch):
    """A worker of torchrun/srun (LOCAL_RANK and WORLD_SIZE set) given --dry-run or --check-data stops with a
    config error instead of training; nothing is written."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for flag in ("--dry-run", "--check-data"):
        res = invoke_cli("sft", "-c", str(TINY_SFT), flag, "--set", f"output_dir={tmp_path / 'o'}")
        assert res.exit_code == 2 and "run in one process: start them without a launcher" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_a_misspelt_fault_is_refused_before_any_work(tmp_path, monkeypatch):
    """RLHF_FAULT (stages/faults.py) is read when the command starts: a misspelt fault is one error line, exit 2,
    with nothing written (not found at the first step, after the data and tokenizer)."""
    monkeypatch.setenv("RLHF_FAULT", "kill@3,explode@4")
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--set", f"output_dir={tmp_path / 'o'}")
    assert res.exit_code == 2 and "RLHF_FAULT: 'explode@4' is not name@step" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_dry_run_makes_the_real_runs_reading_checks_and_still_writes_nothing(tmp_path):
    """What the run refuses before any work, the dry run refuses too: --resume with --overwrite, a folder that
    already holds a run, an output_dir that is a file or cannot be made, a reward model that is not one."""
    def dry_run(*args: str, out: Path = tmp_path / "o"):
        return invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", *args, "--set", f"output_dir={out}")

    res = dry_run("--resume", "--overwrite")
    assert res.exit_code == 2 and "--resume and --overwrite contradict each other" in res.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text('{"step": 1}\n')
    res = dry_run()
    assert res.exit_code == 2 and "already holds a run (metrics.jsonl)" in res.stderr, res.output
    res = dry_run("--allow-config-change", out=tmp_path / "fresh")
    assert res.exit_code == 0 and "warning: --allow-config-change has no effect without --resume" in res.stderr
    res = dry_run("--resume")
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.jsonl"]
    assert "resume: no complete checkpoint here; the run would start fresh" in res.stdout, res.output
    res = dry_run("--overwrite")  # says what the run would delete first, and deletes nothing
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.jsonl"]
    assert f"overwrite: the run would first delete what rlhf wrote in {tmp_path / 'o'}: metrics.jsonl" \
        in res.stdout, res.output
    assert "overwrite:" not in dry_run("--overwrite", out=tmp_path / "fresh").stdout  # (nothing there)
    (tmp_path / "left").mkdir()  # what clear_run deletes, not only what marks a run: a tokenizer, a best/ policy
    for name in ("tokenizer", "best", "notes"):
        (tmp_path / "left" / name).mkdir()
    res = dry_run("--overwrite", out=tmp_path / "left")
    assert f"would first delete what rlhf wrote in {tmp_path / 'left'}: best, tokenizer\n" in res.stdout, res.output
    # a run holding the folder's lock: the dry run says so, as the real run would, and leaves the lock alone
    from stages.checkpoint import acquire_run_lock

    held = acquire_run_lock(tmp_path / "o")
    try:
        res = dry_run("--resume")
        assert res.exit_code == 2 and f"output_dir {tmp_path / 'o'} is in use by another rlhf run (pid " in res.stderr
    finally:
        held.close()
    assert dry_run("--resume").exit_code == 0
    afile = tmp_path / "afile"
    afile.write_text("")
    res = dry_run(out=afile)
    assert res.exit_code == 2 and f"output_dir {afile} is a file, not a directory" in res.stderr, res.output
    res = dry_run(out=afile / "run")  # (a file above it: it could never be made)
    assert res.exit_code == 2 and f"output_dir {afile / 'run'}: {afile} is a file, not a directory" in res.stderr

    def stage_folder(name: str, arch: str) -> Path:
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "config.json").write_text(json.dumps({"architectures": [arch]}))
        return tmp_path / name

    sft, rm = stage_folder("sft", "LlamaForCausalLM"), stage_folder("rm", "LlamaForSequenceClassification")
    ppo = ("ppo", "-c", str(REPO / "configs" / "tiny" / "ppo.yaml"), "--dry-run", "--set", f"output_dir={tmp_path}/p",
           "--set", f"model.name_or_path={sft}")
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={sft}")
    assert res.exit_code == 1 and f"{sft / 'final'} is a LlamaForCausalLM, not a one-label sequence classifier: point " \
        "reward_model.name_or_path at a reward model written by rlhf train-rm" in " ".join(res.stderr.split())
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={rm}", "--set", f"model.name_or_path={rm}")
    assert res.exit_code == 1 and "(a reward model), not a causal LM" in res.stderr, res.output
    assert not (tmp_path / "p").exists()
    # the dry run prints the trick table the run prints at start: what differs from the preset, marked
    one = stage_folder("rm1", "LlamaForSequenceClassification")
    (one / "final" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                           "num_labels": 1}))
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={one}", "--ppo-max", "--kl-coef", "0.2")
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "PPO tricks (preset ppo-max; * = differs from the preset):" in said, res.output
    assert "* ppo.kl_coef 0.2 (preset: 0.05)" in said and "ppo.lam 0.9" in said and "note: ppo.reward_clip" not in said
    # --ppo-max --no-reward-norm keeps the preset's clip of 0.8, now on the raw scores: said
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={one}", "--ppo-max", "--no-reward-norm")
    assert "note: ppo.reward_clip 0.8 clips the raw reward-model scores (reward_norm and reward_scaling are off)" in \
        " ".join(res.stdout.split()), res.output
    # a trick flag's bad value names the flag, a --set's the --set
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={rm}", "--kl-coef", "-1", "--set", "train.iterations=0")
    assert res.exit_code == 2 and "ppo.kl_coef: Input should be greater than or equal to 0 (got -1.0) [given with " \
        "--kl-coef]" in res.stderr and "(got 0) [given with --set]" in res.stderr, res.output
    # a folder that is no model at all (no config.json): named before any tokenizer is tried, in the dry run too
    (tmp_path / "notes").mkdir()
    sft_cfg = ("sft", "-c", str(REPO / "configs" / "tiny" / "sft.yaml"), "--set", f"output_dir={tmp_path}/s",
               "--set", "model.from_config=null")
    res = invoke_cli(*sft_cfg, "--set", f"model.name_or_path={tmp_path / 'notes'}", "--dry-run")
    assert res.exit_code == 1 and f"model.name_or_path {tmp_path / 'notes'} is not a model directory (no config.json" \
        in res.stderr, res.output
    res = invoke_cli(*sft_cfg[:-2], "--set", "model.attn_implementation=sdpaa", "--dry-run")
    assert res.exit_code == 2 and "model.attn_implementation: not one of eager, sdpa, " in res.stderr, res.output
    assert "(got 'sdpaa') [given with --set]" in res.stderr
    # packing on a model type whose attention mask ignores position ids (test_data.py): refused in the dry run,
    # for a from_config model and a local folder alike, and allowed without packing
    opt = stage_folder("opt", "OPTForCausalLM")
    (opt / "final" / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"}))
    for model in (("--set", "model.from_config={model_type: opt, hidden_size: 32, num_hidden_layers: 2, "
                             "num_attention_heads: 4, ffn_dim: 64}"),
                  ("--set", "model.from_config=null", "--set", f"model.name_or_path={opt}")):
        res = invoke_cli(*sft_cfg[:-2], *model, "--set", "data.packing=true", "--dry-run")
        assert res.exit_code == 2 and "data.packing: true is not supported for opt models" in res.stderr, res.output
    assert invoke_cli(*sft_cfg[:-2], "--set", f"model.name_or_path={opt}", "--set", "model.from_config=null",
                      "--dry-run").exit_code == 0
    # a model with a learned position table shorter than the sequences the stage feeds it: refused in the dry run
    # (it would index past the table: an IndexError, a device-side assert on a GPU); the class default counts
    gpt2 = "model.from_config={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: %d}"
    res = invoke_cli(*sft_cfg[:-2], "--set", gpt2 % 64, "--dry-run")
    assert res.exit_code == 2 and "data.max_length = 96 tokens, but model (gpt2) has learned positions for 64 " \
        "only" in res.stderr, res.output
    assert invoke_cli(*sft_cfg[:-2], "--set", gpt2 % 96, "--dry-run").exit_code == 0
    res = invoke_cli(*sft_cfg[:-2], "--set", "model.from_config={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2}",
                     "--set", "data.max_length=1025", "--dry-run")
    assert res.exit_code == 2 and "has learned positions for 1024 only" in res.stderr, res.output
    (rm / "final" / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"],
                                                          "model_type": "gpt2", "n_positions": 88, "num_labels": 1}))
    res = invoke_cli(*ppo, "--set", f"reward_model.name_or_path={rm}")  # 64 + 24 + an EOS
    assert res.exit_code == 2 and "data.max_prompt_length + generation.max_new_tokens + 1 (an EOS appended) = 89 " \
        "tokens, but reward_model (gpt2) has learned positions for 88 only" in res.stderr, res.output
    # rlhf eval of a policy that is not here: refused before its default --out (POLICY/eval.json) makes a folder
    res = invoke_cli("eval", "no-such-policy-here", "--reward-model", str(rm), "--prompts",
                     str(REPO / "configs" / "tiny" / "data" / "eval_prompts.jsonl"))
    assert res.exit_code == 2 and "POLICY no-such-policy-here: no such directory here" in res.stderr, res.output
    assert not Path("no-such-policy-here").exists()


def test_an_output_dir_that_cannot_be_made_is_one_error_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    cfg = write_yaml(tmp_path / "sft.yaml", tiny_sft_dict(tmp_path) | {"output_dir": str(afile / "sub")})
    res = run_cli("sft", "-c", str(cfg))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [  # (as the config is read: its dry run too)
        f"error: output_dir {afile / 'sub'}: {afile} is a file, not a directory"], res.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n')
    res = invoke_cli("report", str(run), "--out", str(afile))
    assert res.exit_code == 2 and f"error: --out {afile} is a file, not a directory" in res.stderr, res.output
    res = invoke_cli("report", str(run), "--out", str(tmp_path / "rep"), "--x-axis", "steps")
    assert res.exit_code == 2 and "error: x axis 'steps' is not one of policy, iteration" in res.stderr, res.output
    assert re.search(r"--x-axis\s+policy\|iteration", invoke_cli("report", "--help").stdout)  # (its choices)
    res = invoke_cli("report", str(run), "--out", str(tmp_path / "rep"), "--x-axis", "iteration")
    assert res.exit_code == 0 and json.loads((tmp_path / "rep" / "report.json").read_text())["x_axis"] == "iteration"


def test_world_size_counts_processes_as_deepspeeds_runner_does(tmp_path):
    """Hosts may have different slot counts: the first --num-nodes hosts, --num-gpus each when given, else
    each host's slots (what --resume compares with the process count a checkpoint was written by)."""
    from rlhf_cli.launcher import world_size

    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=4\nb slots=8\n")
    assert world_size(None, None, hostfile) == 12 and world_size(None, 1, hostfile) == 4
    assert world_size(2, None, hostfile) == 4 and world_size(2, 1, hostfile) == 2
    assert world_size(None, None, None) == 1 and world_size(3, None, None) == 3
    hostfile.write_text("a slots=4\nb slots=8\na slots=2\n")
    with pytest.raises(ConfigError, match="line 3: host a is listed twice"):
        world_size(None, None, hostfile)


def test_cli_dry_run_single_process_and_hostfile(tmp_path):
    res = run_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/o")
    assert res.returncode == 0 and "this process (single rank, no launcher)" in res.stdout

    def dry_run(*args: str):  # the rest in this interpreter
        return invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", *args, "--set", f"output_dir={tmp_path}/o")

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8  # second node\n")
    res = dry_run("--hostfile", str(hostfile), "--num-nodes", "2")
    assert res.exit_code == 0, res.output
    assert f"--hostfile {hostfile} --num_nodes 2 --log_level warning --no_local_rank" in res.stdout
    # the other nodes' ranks are stopped through a file in output_dir (absolute: they read it from there)
    assert f"PYTHON_RLHF_STOP_FILE={tmp_path.resolve()}/o/.rlhf-stop " in res.stdout.replace("\n", "")
    res = dry_run("--num-nodes", "2")
    assert res.exit_code == 2 and "--num-nodes > 1 needs --hostfile" in res.stderr
    hostfile.write_text("node-a slots=8\nnode-b slots=2\nnode-c slots=1\n")  # the runner ignores slots given --num_gpus
    res = dry_run("--hostfile", str(hostfile), "--num-gpus", "4")
    assert res.exit_code == 2 and f"--num-gpus 4 (workers per host) but {hostfile} gives node-b slots=2, node-c " \
        "slots=1;" in " ".join(res.stderr.split())
    assert dry_run("--hostfile", str(hostfile), "--num-gpus", "2", "--num-nodes", "2").exit_code == 0  # hosts used
    hostfile.write_text("node-a slots=8\nnode-b slots=0\n")
    res = dry_run("--hostfile", str(hostfile), "--set", "deepspeed.zero_stage=2")
    assert res.exit_code == 2 and f"{hostfile} line 2: slots must be at least 1, got 'slots=0'" in res.stderr
    # a raw deepspeed.config that contradicts the YAML: caught by the dry run as by the real run
    res = dry_run("--set", "deepspeed.config={train_batch_size: 7}")
    assert res.exit_code == 2 and "deepspeed.config sets train_batch_size=7" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


#: run in a fresh interpreter: every command's and sub-command's --help (found from the click group, so a new
#: command is covered), a config error of each stage, the pipeline file and each `rlhf bench` command (exit 2), and
#: a missing data file, then which heavy libraries that imported
_QUICK_IMPORTS = """
import os
import sys
from typer.main import get_command
from typer.testing import CliRunner
from rlhf_cli.app import app

def helps(group, path):
    yield path
    for name, sub in getattr(group, "commands", {}).items():
        yield from helps(sub, path + [name])

for path in helps(get_command(app), []):
    res = CliRunner().invoke(app, path + ["--help"])
    assert res.exit_code == 0 and "Usage" in res.stdout, (path, res.output)
    print(" ".join(path))
for command, config, key in [("sft", "sft", "train.bogus"), ("train-rm", "rm", "train.bogus"),
                             ("ppo", "ppo", "ppo.bogus"), ("pipeline", "pipeline", "bogus")]:
    res = CliRunner().invoke(app, [command, "-c", f"configs/tiny/{config}.yaml", "--set", f"{key}=1"])
    assert res.exit_code == 2 and f"unknown key '{key}'" in res.stderr, (command, res.output)
    print(command, "refused")
res = CliRunner().invoke(app, ["sft", "-c", "configs/tiny/sft.yaml", "--set", "data.train=/nowhere/x.jsonl"])
assert res.exit_code == 2 and "data.train.path: path does not exist: /nowhere/x.jsonl" in res.stderr, res.output
print("missing path refused")
for command in ("ppo", "generate", "trl", "floor"):
    res = CliRunner().invoke(app, ["bench", command, "--workload", "w1", "--set", "bogus=1"])
    assert res.exit_code == 2 and "unknown key 'bogus'" in res.stderr, (command, res.output)
    print("bench", command, "refused")
res = CliRunner().invoke(app, ["bench", "ppo", "--workload", "w1", "--set", "ppo.train.bogus=1"])
assert res.exit_code == 2 and "unknown key 'train.bogus'" in res.stderr and "ppo: section" in res.stderr, res.output
print("bench ppo section refused")
res = CliRunner().invoke(app, ["pipeline", "-c", "configs/tiny/pipeline.yaml", "--set", "ppo.set=[train.bogus=1]"])
assert res.exit_code == 2 and "stage ppo-max" in res.stderr and "unknown key 'train.bogus'" in res.stderr, res.output
print("pipeline's last stage refused")
res = CliRunner().invoke(app, ["eval", "configs", "-c", "configs/tiny/ppo.yaml", "--reward-model", "configs",
                               "--set", "generation.bogus=1"])
assert res.exit_code == 2 and "unknown key 'generation.bogus'" in res.stderr, res.output
res = CliRunner().invoke(app, ["eval", "/nowhere/x", "--prompts", "configs/tiny/ppo.yaml", "--reward-model", "x"])
assert res.exit_code == 2 and "POLICY: model /nowhere/x: no such file or directory" in res.stderr, res.output
res = CliRunner().invoke(app, ["eval", "configs", "--prompts", "configs/tiny/ppo.yaml", "--reward-model", "/no/rm"])
assert res.exit_code == 2 and "--reward-model: model /no/rm: no such file or directory" in res.stderr, res.output
res = CliRunner().invoke(app, ["eval", "typo", "--prompts", "configs/tiny/ppo.yaml", "--reward-model", "configs"])
assert res.exit_code == 2 and "POLICY typo: no such directory here" in res.stderr, res.output  # (a hub id's shape)
for given, kind in (("configs", "is"), ("configs/no-such-folder/", "names")):  # pathlib would drop the "/"
    res = CliRunner().invoke(app, ["eval", "configs", "--prompts", "configs/tiny/ppo.yaml", "--reward-model",
                                   "configs", "--out", given])
    assert res.exit_code == 2 and f"--out {given} {kind} a directory; give the file to write (e.g. " \
        f"{given.rstrip('/')}/eval.json)" in res.stderr, res.output
assert not os.path.exists("configs/no-such-folder")
print("eval refused")
for command in (["bench", "ppo", "--workload", "tiny"], ["bench", "trace", "configs/tiny/ppo.yaml"]):
    res = CliRunner().invoke(app, command + ["--out", "configs/no-such-folder/"])  # before any work
    assert res.exit_code == 2 and "--out configs/no-such-folder/ names a directory" in res.stderr, res.output
res = CliRunner().invoke(app, ["bench", "generate", "--workload", "tiny", "--out", "configs/tiny/ppo.yaml/r.json"])
assert res.exit_code == 2 and "--out configs/tiny/ppo.yaml/r.json: configs/tiny/ppo.yaml is a file" in res.stderr, res.output
assert not os.path.exists("configs/no-such-folder")
print("bench --out refused")
print("heavy:", sorted(m for m in ("torch", "transformers", "deepspeed", "datasets") if m in sys.modules))
"""


def test_help_and_config_errors_import_no_torch():
    """`rlhf --help`, every command's --help, a config error (an unknown key) of a stage, the pipeline file, its
    last stage, a benchmark or its ppo: section, an `rlhf eval` option error, and a missing data file or model
    import neither torch, transformers, DeepSpeed nor datasets: ~1 s rather than 3.5-9 s. (A from_config
    architecture is checked against transformers' config class once the rest of the config is valid, its paths
    included: `STRUCTURE_ONLY`; the pipeline checks every stage so before any architecture.)"""
    res = subprocess.run([sys.executable, "-c", _QUICK_IMPORTS], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert {"sft", "train-rm", "ppo", "pipeline", "eval", "report", "env", "bench", "bench ppo"} <= set(lines), lines
    assert {"sft refused", "train-rm refused", "ppo refused", "pipeline refused", "missing path refused",
            "bench ppo refused", "bench generate refused", "bench trl refused", "bench floor refused",
            "bench ppo section refused", "pipeline's last stage refused", "eval refused"} <= set(lines), lines
    assert lines[-1] == "heavy: []", res.stdout


@pytest.mark.parametrize("args", [["--help"], ["sft", "--help"], ["env", "--help"]])
def test_every_help_exits_0(args):
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout


def test_a_usage_error_is_one_error_line_with_exit_2():
    """Typer's own checks (an option's range, an unknown option) end like every other error: one `error:`
    line on stderr, naming the option and where the help is, exit 2; no boxed usage text."""
    res = run_cli("sft", "-c", str(TINY_SFT), "--num-gpus", "0", "--bogus")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: No such option: --bogus (see rlhf sft --help)"], res.stderr
    res = run_cli("sft", "-c", str(TINY_SFT), "--num-gpus", "0")
    (line,) = res.stderr.strip().splitlines()  # the range's wording is typer's
    assert res.returncode == 2 and line.startswith("error: Invalid value for '--num-gpus'") and line.endswith(
        "(see rlhf sft --help)")


def test_help_shows_every_option_with_default():
    res = run_cli("sft", "--help")
    for option in ("--config", "--set", "--num-gpus", "--num-nodes", "--hostfile", "--dry-run", "--check-data",
                   "--gpu-memory", "--fit-micro-batch", "--resume", "--allow-config-change", "--overwrite", "--debug"):
        assert option in res.stdout
    assert "[default: (every host in --hostfile, else 1)]" in res.stdout  # --num-nodes
    # --dry-run --check-data --fit-micro-batch --resume --allow-config-change --overwrite --debug
    assert res.stdout.count("[default: (off)]") == 7
    # a flag takes no value: no `<bool>` type beside it (typer 0.2x printed one), other options keep theirs
    assert "<bool>" not in res.stdout and "<path>" in res.stdout and "KEY=VALUE" in res.stdout
    assert "<bool>" not in run_cli("ppo", "--help").stdout  # --reward-norm/--no-reward-norm pairs alike


def test_version_and_env():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("rlhf ")
    res = run_cli("env", "--json")
    assert res.returncode == 0, res.stderr
    import json

    info = json.loads(res.stdout)
    for key in ("python", "torch", "transformers", "deepspeed", "trl", "cuda (torch build)"):
        assert key in info
    assert isinstance(info["cuda available"], bool) and isinstance(info["cpu threads"], int)  # typed JSON


def test_env_lists_each_gpu_with_its_memory(monkeypatch):
    """On a GPU machine `rlhf env` names each GPU with its total memory (what --gpu-memory's default reads)."""
    import torch

    from rlhf_cli.env_info import collect_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("Props", (), {"total_memory": (81559 - 40960 * i) * 2**20})())
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    info = collect_env()
    assert info["gpus"] == "NVIDIA H100 80GB HBM3 (79.6 GiB), NVIDIA H100 80GB HBM3 (39.6 GiB)", info


def test_refuses_to_mix_runs_in_one_output_dir(tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "final").mkdir(parents=True)
    res = run_cli("sft", "-c", str(TINY_SFT), "--set", f"output_dir={out_dir}")
    assert res.returncode == 2
    assert "already holds a run" in res.stderr and "--resume" in res.stderr and "--overwrite" in res.stderr


#: shipped config file stem -> the stage that reads it
CONFIG_STAGES = {"sft": "sft", "rm": "train-rm", "ppo": "ppo"}


def test_shipped_configs_validate(tmp_path):
    checked = []
    for path in (REPO / "configs").rglob("*.yaml"):
        stage = CONFIG_STAGES.get(path.stem)
        if stage is None:
            continue
        text = yaml.safe_load(path.read_text())
        overrides = []
        for section in ("model", "reward_model"):
            model_path = (text.get(section) or {}).get("name_or_path")
            if model_path and not (path.parent / model_path).exists():  # an earlier stage's output, not trained here
                overrides.append(f"{section}.name_or_path={tmp_path}")
        load_config(stage, path, overrides)
        checked.append(path)
    assert {REPO / "configs" / "tiny" / name for name in ("sft.yaml", "rm.yaml", "ppo.yaml")} <= set(checked)


def test_prepare_output_dir_refuses_mixing_and_clears_stale_attempts(tmp_path):
    from stages.checkpoint import prepare_output_dir

    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)  # left by an attempt that failed before training
    prepare_output_dir(out, "a: 1\n", resume=False, overwrite=False)
    assert not (out / "tokenizer").exists() and (out / "resolved_config.yaml").read_text() == "a: 1\n"
    (out / "tokenizer").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    prepare_output_dir(out, "a: 1\n", resume=True, overwrite=False)  # nothing to resume: a fresh start, no leftovers
    assert sorted(p.name for p in out.iterdir()) == ["inputs.json", "resolved_config.yaml"]
    (out / "checkpoint-00000002").mkdir()
    (out / "checkpoint-00000002" / "COMPLETE").write_text("ok\n")
    (out / "tokenizer").mkdir()
    (out / "profile-step-2.json.gz").write_bytes(b"")  # logging.profile_step's: an earlier run's, not this one's
    with pytest.raises(ConfigError, match="already holds a run .checkpoint-00000002"):
        prepare_output_dir(out, "a: 2\n", resume=False, overwrite=False)
    (out / "final").mkdir()  # a run of this stage: --resume continues it, so it is advised
    (out / "final" / "rlhf_checkpoint.json").write_text('{"stage": "sft"}')
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-00000002, .*pass --resume to continue"):
        prepare_output_dir(out, "a: 2\n", resume=False, overwrite=False, stage="sft")
    shutil.rmtree(out / "final")
    with pytest.raises(ConfigError, match="differs from the one that wrote .*checkpoint-00000002: a: 1 -> 2"):
        prepare_output_dir(out, "a: 2\n", resume=True, overwrite=False)
    assert prepare_output_dir(out, "a: 2\n", resume=True, overwrite=False, allow_changes=True) == ["a: 1 -> 2"]
    assert (out / "tokenizer").exists() and (out / "checkpoint-00000002").exists()  # resuming keeps everything
    assert (out / "tokenizer").exists() and (out / "checkpoint-00000002").exists()
    assert (out / "profile-step-2.json.gz").exists()
    prepare_output_dir(out, "a: 3\n", resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["inputs.json", "resolved_config.yaml"]
    with pytest.raises(ConfigError, match="contradict"):
        prepare_output_dir(out, "", resume=True, overwrite=True)


def test_a_fresh_start_refuses_to_delete_an_input_it_would_read(tmp_path):
    """model.name_or_path inside the output_dir's checkpoint (to restart from its weights, as the ZeRO refusal
    suggests): --overwrite, or --resume with no checkpoint to resume, would delete it first; refused naming the
    key, nothing deleted. A model elsewhere in the output_dir (not written by a run), or a resume that keeps
    everything, is fine."""
    from stages.checkpoint import prepare_output_dir

    out = tmp_path / "out"
    hf = out / "checkpoint-00000002" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (out / "checkpoint-00000002" / "COMPLETE").write_text("ok\n")
    cfg = yaml.safe_load(TINY_SFT.read_text())
    cfg.update(output_dir=str(out), model={"name_or_path": str(hf)})
    cfg["data"]["train"] = str(TINY_SFT.parent / cfg["data"]["train"])
    text = yaml.safe_dump(cfg)
    with pytest.raises(ConfigError, match=f"model.name_or_path {hf} lies in {out / 'checkpoint-00000002'}, which a "
                                          "fresh start in output_dir .* deletes"):
        prepare_output_dir(out, text, resume=False, overwrite=True, stage="sft")
    assert (hf / "config.json").is_file()
    (out / "mine").mkdir()
    shutil.copytree(hf, out / "mine" / "hf")
    cfg["model"]["name_or_path"] = str(out / "mine" / "hf")
    prepare_output_dir(out, yaml.safe_dump(cfg), resume=False, overwrite=True, stage="sft")
    assert (out / "mine" / "hf" / "config.json").is_file() and not (out / "checkpoint-00000002").exists()
    (out / "final").mkdir()  # the output_dir itself, a finished run's folder standing for its final/
    (out / "final" / "config.json").write_text("{}")
    cfg["model"]["name_or_path"] = str(out)
    with pytest.raises(ConfigError, match=f"model.name_or_path {out} is the output_dir itself, whose run \\(final, inputs.json, "
                                          "resolved_config.yaml\\) a fresh start there deletes first"):
        prepare_output_dir(out, yaml.safe_dump(cfg), resume=False, overwrite=True, stage="sft")
    assert (out / "final" / "config.json").is_file()
    (out / "config.json").write_text("{}")  # a plain model folder: read from its top, which a fresh start keeps
    prepare_output_dir(out, yaml.safe_dump(cfg), resume=False, overwrite=True, stage="sft")
    assert (out / "config.json").is_file() and not (out / "final").exists()


def test_set_reaches_into_the_short_form_of_a_data_source(tmp_path):
    cfg = load_config("sft", _cfg_file(tmp_path, data__train="org/dataset"), ["data.train.split=validation"])
    assert cfg.data.train.split == "validation" and cfg.data.train.path == "org/dataset"


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.config=5", "deepspeed.config: Input should be a valid string, or a valid dictionary (got 5)"),
        ("data.train=[]", "data.train.path: List should have at least 1 item"),
        ("data.train=[3]", "data.train.path[0]: Input should be a valid string (got 3)"),
        ("train.adam_betas=[0.9]", "train.adam_betas: too few items (nothing at index 1)"),
        ("train.adam_betas=[0.9, 1.5]", "train.adam_betas[1]: Input should be less than 1 (got 1.5)"),
        ("train.epochs=.inf", "train.epochs: Input should be a finite number (got inf)"),
        ("train.lr=.nan", "train.lr: Input should be a finite number (got nan)"),
        ("train.gradient_clipping=.inf", "train.gradient_clipping: Input should be a finite number (got inf)"),
    ],
)
def test_union_and_list_errors_name_the_real_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), [override])
    assert message in str(exc.value) and str(exc.value).count("\n") == 0  # one line, one problem


def _config_keys(model: type, prefix: str = "", seen: set | None = None):
    """Dotted keys of a schema's values (not of its sections); a section type documented once (e.g. DataSource under data.train) is not
    listed again under another key."""
    from pydantic import BaseModel

    seen = set() if seen is None else seen
    for name, info in model.model_fields.items():
        key = prefix + name
        subs = [a for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)]
        if not subs:
            yield key
        elif subs[0] not in seen:
            seen.add(subs[0])
            yield from _config_keys(subs[0], key + ".", seen)


@pytest.mark.parametrize("stage", ["sft", "train-rm", "ppo"])
def test_readme_documents_every_config_key(stage):
    from stages.config import STAGE_SCHEMAS

    readme = (REPO / "README.md").read_text()
    missing = []
    for key in _config_keys(STAGE_SCHEMAS[stage]):
        parent, _, leaf = key.rpartition(".")
        if f"`{key}`" not in readme and not (parent and f"`{parent}." in readme and f"`.{leaf}`" in readme):
            missing.append(key)
    assert not missing, f"README lacks {stage} config keys: {missing}"


def test_remove_shm_buffers_deletes_only_that_runs_files(tmp_path):
    from rlhf_cli.launcher import remove_shm_buffers

    mine = [tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_41234_{r}" for r in (0, 1)]
    others = [tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_4123_0",
              tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_412345_0", tmp_path / "torch_shm_41234_0"]
    for f in mine + others:
        f.write_bytes(b"x")
    assert sorted(remove_shm_buffers(41234, tmp_path)) == sorted(mine)
    assert all(f.is_file() for f in others) and not any(f.exists() for f in mine)


def test_multi_node_launch_takes_master_port_and_address_from_the_environment(tmp_path, monkeypatch):
    from rlhf_cli.launcher import launch_command

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cmd = launch_command("sft", tmp_path / "c.yaml", None, 2, hostfile, False)
    assert "--master_port" not in cmd and "--master_addr" not in cmd  # DeepSpeed's defaults: 29500, its guess
    monkeypatch.setenv("MASTER_PORT", "31234")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # (the guess may be a docker or management interface)
    cmd = launch_command("sft", tmp_path / "c.yaml", None, 2, hostfile, False)
    assert cmd[cmd.index("--master_port") + 1] == "31234" and cmd[cmd.index("--master_addr") + 1] == "10.1.2.3"
    cmd = launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)  # one node: neither is inherited
    assert cmd[cmd.index("--master_port") + 1] != "31234" and "--master_addr" not in cmd


def test_a_run_in_this_process_binds_a_free_port_not_an_inherited_master_port(tmp_path):
    """An exported MASTER_PORT (meant for a multi-node launch) would have two one-GPU jobs on a node bind the
    same port: the second failed with EADDRINUSE."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
        code = ("import os; from stages.distributed import setup_distributed; "
                "print(setup_distributed().world_size, os.environ['MASTER_PORT'])")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={**env, "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    size, used = res.stdout.split()[-2:]
    assert size == "1" and int(used) != port


def test_a_launch_without_hostfile_stays_on_this_node_where_deepspeeds_default_hostfile_exists(tmp_path,
                                                                                               monkeypatch):
    """DeepSpeed's runner reads /job/hostfile when given no --hostfile; where that file exists (DLTS-style
    clusters) `rlhf --num-gpus 2` must still launch on this node only, as rlhf counts its processes: the runner
    is handed a hostfile path that is no file, which it reads as "local resources only"."""
    from deepspeed.launcher.runner import DLTS_HOSTFILE, fetch_hostfile

    from rlhf_cli import launcher

    assert str(launcher.DS_DEFAULT_HOSTFILE) == DLTS_HOSTFILE
    monkeypatch.setattr(launcher, "DS_DEFAULT_HOSTFILE", tmp_path / "missing")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)
    assert "--hostfile" not in cmd
    (tmp_path / "job-hostfile").write_text("node-a slots=8\nnode-b slots=8\n")
    monkeypatch.setattr(launcher, "DS_DEFAULT_HOSTFILE", tmp_path / "job-hostfile")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)
    assert cmd[cmd.index("--hostfile") + 1] == os.devnull and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert fetch_hostfile(os.devnull) is None  # DeepSpeed: no resource pool, i.e. this node's devices
    assert launcher.world_size(2, None, None) == 2


def test_a_single_node_launch_keeps_to_the_gpus_cuda_visible_devices_lists(tmp_path, monkeypatch):
    """DeepSpeed's runner, given --num_gpus, drops CUDA_VISIBLE_DEVICES and starts ranks on GPUs 0..N-1 (someone
    else's on a shared node): rlhf hands it the first N visible ids instead (--include, which the runner's own
    arguments and resource filter accept); more than are visible is refused; UUIDs become their indices. A CPU
    run (DeepSpeed's CPU accelerator) leaves an inherited CUDA_VISIBLE_DEVICES alone: --num_gpus."""
    from deepspeed.launcher.runner import parse_args, parse_inclusion_exclusion

    from rlhf_cli import launcher

    monkeypatch.setattr(launcher, "DS_DEFAULT_HOSTFILE", tmp_path / "missing")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)
    assert "--num_gpus" not in cmd and cmd[cmd.index("--include") + 1] == "localhost:4,5"
    args = parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:])
    assert (args.include, args.num_gpus, args.num_nodes) == ("localhost:4,5", -1, -1)  # (the runner's defaults)
    assert dict(parse_inclusion_exclusion({"localhost": 8}, args.include, "")) == {"localhost": [4, 5]}
    assert launcher.world_size(2, None, None) == 2
    with pytest.raises(ConfigError, match="--num-gpus 4 but CUDA_VISIBLE_DEVICES=4,5,6 makes 3 GPU"):
        launcher.launch_command("sft", tmp_path / "c.yaml", 4, None, None, False)
    # GPUs named by UUID (a unique prefix, as CUDA takes it): their indices, from nvidia-smi
    monkeypatch.setattr(launcher, "gpu_uuids", lambda: {"0": "GPU-9f9f-aaaa", "1": "GPU-1a2b-bbbb", "2": "GPU-3c4d-cccc"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3c4d,GPU-1a2b-bbbb")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, None, False)
    assert cmd[cmd.index("--include") + 1] == "localhost:2,1" and "--num_gpus" not in cmd
    # ... and one it cannot place, or a MIG instance, is refused rather than left to --num_gpus (GPUs 0..N-1)
    # no GPU visible (-1, NoDevFiles: CUDA stops at an invalid entry): the runner's --num_gpus, as for a CPU run
    for hidden in ("-1", "NoDevFiles", "3,-1,4"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 1, None, None, False)
        if hidden == "3,-1,4":
            assert cmd[cmd.index("--include") + 1] == "localhost:3"
        else:
            assert "--num_gpus" in cmd and "--include" not in cmd, hidden
    for bad in ("GPU-ffff", "MIG-1a2b-bbbb/1/0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", bad)
        with pytest.raises(ConfigError, match=f"CUDA_VISIBLE_DEVICES names '{bad}', which rlhf cannot hand"):
            launcher.launch_command("sft", tmp_path / "c.yaml", 1, None, None, False)
    # unset: more GPUs than nvidia-smi finds here is refused (the runner would start the extra ranks, each
    # failing with a CUDA error); a CPU run (DS_ACCELERATOR=cpu) is not asked about GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 3, None, None, False)
    assert cmd[cmd.index("--num_gpus") + 1] == "3"
    with pytest.raises(ConfigError, match="--num-gpus 4 but nvidia-smi finds 3 GPU"):
        launcher.launch_command("sft", tmp_path / "c.yaml", 4, None, None, False)
    hosts = tmp_path / "hosts"  # a multi-node run's GPUs are the other nodes': this one's count says nothing
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    assert "--num_gpus" in launcher.launch_command("sft", tmp_path / "c.yaml", 8, None, hosts, False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert "--num_gpus" in launcher.launch_command("sft", tmp_path / "c.yaml", 4, None, None, False)


def test_a_config_or_hostfile_not_in_utf8_is_one_clear_error(tmp_path):
    """A YAML or hostfile saved in another encoding (cp1252 here): exit 2 naming the file and the byte, no
    traceback."""
    text = TINY_SFT.read_text().replace("data/", str(TINY_SFT.parent / "data") + "/")
    (tmp_path / "sft.yaml").write_bytes((text + "# café\n").encode("cp1252"))
    res = invoke_cli("sft", "-c", str(tmp_path / "sft.yaml"), "--dry-run", "--set", f"output_dir={tmp_path}/o")
    assert res.exit_code == 2 and f"config file {tmp_path / 'sft.yaml'} is not UTF-8 text (byte" in res.stderr
    assert "save it as UTF-8" in res.stderr and "Traceback" not in res.output
    (tmp_path / "hosts").write_bytes("localhost slots=2 # café\n".encode("cp1252"))
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--hostfile", str(tmp_path / "hosts"),
                     "--set", f"output_dir={tmp_path}/o")
    assert res.exit_code == 2 and f"--hostfile {tmp_path / 'hosts'} is not UTF-8 text (byte 23: " in res.stderr, res.output


def test_launched_mark_reaches_the_workers_of_every_node():
    """DeepSpeed's pdsh runner exports to remote nodes only variables with its listed prefixes."""
    from deepspeed.launcher.runner import EXPORT_ENVS

    from rlhf_cli.launcher import LAUNCHED_MARK, launch_env, launched_by_rlhf

    assert any(LAUNCHED_MARK.startswith(prefix) for prefix in EXPORT_ENVS)
    env = launch_env(2)
    assert env[LAUNCHED_MARK] == "1" and launched_by_rlhf(env) and not launched_by_rlhf({})


def test_error_lines_print_the_message_as_it_is(capsys):
    # messages name keys and rows in brackets (train[3], [1, 2]); rich must not read them as markup, and a
    # stray closing tag must not crash the error report
    import typer

    from rlhf_cli.output import fail

    with pytest.raises(typer.Exit) as stop:
        fail(ConfigError("data.train[3]: expected [1, 2], got [/x] [bold]y[/bold]"), debug=False)
    assert stop.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: data.train[3]: expected [1, 2], got [/x] [bold]y[/bold]"


def test_a_key_a_newer_rlhf_added_is_no_change_at_its_default():
    """Resuming (or reusing a complete pipeline stage) after an upgrade that added a config key: the earlier
    resolved config lacks it; at its default it changes nothing, at another value it is a change."""
    from stages.checkpoint import config_changes

    before = {"seed": 1, "data": {"train": "p.jsonl"}, "generation": {"temperature": 0.8}}
    now = {"seed": 1, "data": {"train": "p.jsonl", "rendering_check": "error"},
           "generation": {"temperature": 0.8, "stop_token_ids": []}}
    assert config_changes(before, now, "ppo") == []
    assert config_changes(before, now) == ["data.rendering_check: '(unset)' -> 'error'",
                                           "generation.stop_token_ids: '(unset)' -> []"]
    now["data"]["rendering_check"] = "warn"
    now["generation"]["stop_token_ids"] = [7]
    assert config_changes(before, now, "ppo") == ["data.rendering_check: '(unset)' -> 'warn'",
                                                  "generation.stop_token_ids: '(unset)' -> [7]"]
    # a key the earlier run had is compared as always, and one no schema knows is a change
    assert config_changes({"seed": 1}, {"seed": 2, "nonsense": 0}, "ppo") == ["nonsense: '(unset)' -> 0",
                                                                             "seed: 1 -> 2"]


def test_a_section_set_where_it_was_null_is_one_change_line():
    """data.eval: null -> {path, split, subset} (or back) is said as one line with the whole section, where it
    used to read `data.eval: None -> '(unset)'; data.eval.path: '(unset)' -> ...`; inside sections set on both
    sides each key is its own line."""
    from stages.checkpoint import config_changes

    section = {"path": "/d/e.jsonl", "split": "train", "subset": None}
    base = {"seed": 1, "data": {"train": {"path": "/d/t.jsonl"}, "eval": None}}
    with_eval = {"seed": 2, "data": {"train": {"path": "/d/t.jsonl"}, "eval": section}}
    assert config_changes(base, with_eval, "sft") == [f"data.eval: None -> {section!r}", "seed: 1 -> 2"]
    assert config_changes(with_eval, base, "sft") == [f"data.eval: {section!r} -> None", "seed: 2 -> 1"]
    assert config_changes(with_eval, {**with_eval, "data": {**with_eval["data"], "eval": {**section, "path": "/x"}}},
                          "sft") == ["data.eval.path: '/d/e.jsonl' -> '/x'"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refused only on a machine without a GPU")
def test_fp16_on_a_machine_without_a_gpu_is_refused_before_anything_runs(tmp_path):
    """DeepSpeed's CPU accelerator has no fp16: a run here is refused at once (exit 2, nothing written), where it
    used to fail after data loading and model building with a traceback from every rank; --dry-run warns (it may
    be checking a config meant for a GPU machine)."""
    args = ("sft", "-c", str(TINY_SFT), "--set", f"output_dir={tmp_path}/s", "--set", "deepspeed.precision=fp16")
    res = invoke_cli(*args)
    assert res.exit_code == 2 and "deepspeed.precision: fp16 needs a GPU, and this machine has none" in res.stderr
    assert not (tmp_path / "s").exists()
    res = invoke_cli(*args, "--dry-run")
    assert res.exit_code == 0 and "a run on this machine would be refused" in res.stderr, res.output


def test_yaml_off_means_off_and_stop_token_ids_are_token_ids(tmp_path):
    """`data.rendering_check: off` unquoted (YAML 1.1 reads false) is the documented "off"; a negative stop id is
    refused naming its position (it would mask a real token at min_new_tokens)."""
    ppo = REPO / "configs" / "tiny" / "ppo.yaml"
    common = ["--dry-run", "--set", f"output_dir={tmp_path}/p", "--set", f"model.name_or_path={tmp_path}",
              "--set", f"reward_model.name_or_path={tmp_path}"]
    from rlhf_cli.config_loader import load_config

    cfg = load_config("ppo", ppo, ["data.rendering_check=off", f"model.name_or_path={tmp_path}",
                                   f"reward_model.name_or_path={tmp_path}"])
    assert cfg.data.rendering_check == "off"
    res = invoke_cli("ppo", "-c", str(ppo), *common, "--set", "generation.stop_token_ids=[5, -1]")
    assert res.exit_code == 2 and "generation.stop_token_ids[1]: Input should be greater than or equal to 0 (got -1)" \
        in res.stderr, res.output


def test_a_check_across_keys_names_the_command_line_key_it_involves(tmp_path):
    """A whole-config check (PTX weight without PTX data) or a section's (two model sources) caused by a key
    given on the command line says so, as a single key's error does; no "(top level):" prefix."""
    ppo = ("ppo", "-c", str(REPO / "configs" / "tiny" / "ppo.yaml"), "--dry-run", "--set", f"output_dir={tmp_path}/p",
           "--set", f"model.name_or_path={tmp_path}", "--set", f"reward_model.name_or_path={tmp_path}")
    res = invoke_cli(*ppo, "--ptx-coef", "0.5")
    assert res.exit_code == 2 and res.stderr.strip().endswith(
        "ppo.yaml: ppo.ptx_coef > 0 needs data.ptx (SFT-format data for the PTX loss) [given with --ptx-coef]"), res.stderr
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/s",
                     "--set", "model.name_or_path=gpt2")
    assert res.exit_code == 2 and "model: set exactly one of name_or_path (a hub id or directory) and from_config: " \
        "both are set (to load a checkpoint in a config that builds its model, also give --set " \
        "model.from_config=null) [given with --set]" in res.stderr, res.stderr
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/s",
                     "--set", "model.name_or_path=gpt2", "--set", "model.from_config=null")  # as the hint says
    assert "model: set exactly one" not in res.stderr, res.stderr
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/s",
                     "--set", "data.max_length=8", "--set", "data.max_prompt_length=9")
    assert res.exit_code == 2 and "max_prompt_length (9) must be smaller than max_length (8) [given with --set]" \
        in res.stderr, res.stderr
    # ... but not for a key of the section the message does not name (the file's lengths caused this one)
    cfg = tiny_sft_dict(tmp_path)
    cfg["data"]["max_prompt_length"] = 200
    res = invoke_cli("sft", "-c", str(write_yaml(tmp_path / "bad.yaml", cfg)), "--dry-run", "--set",
                     "data.on_bad_row=skip")
    assert res.exit_code == 2 and res.stderr.strip().endswith("must be smaller than max_length (96)"), res.stderr


def test_a_text_value_that_reads_as_yaml_says_to_quote_it(tmp_path):
    """--set values are YAML: a chat template with ': ' reads as a mapping, one with {{ }} does not parse; both
    errors say to quote the text, and the quoted forms work."""
    args = ("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/s")
    res = invoke_cli(*args, "--set", "data.chat_template=a: b")
    assert res.exit_code == 2 and "data.chat_template: Input should be a valid string (got a mapping: a text with " \
        "': ', braces or brackets is read as YAML; quote it) [given with --set]" in res.stderr, res.stderr
    res = invoke_cli(*args, "--set", "data.chat_template={{ messages }}")
    assert res.exit_code == 2 and "quote a text value: --set 'data.chat_template=\"...\"'" in res.stderr, res.stderr
    assert invoke_cli(*args, "--set", 'data.chat_template="{{ messages }}: {{ x }}"').exit_code == 0


def test_ppo_dry_run_checks_the_raw_deepspeed_json_for_both_engines(tmp_path):
    """A raw optimizer lr equal to train.policy_lr fits the policy's engine but not the critic's (critic_lr): the
    dry run builds both engines' JSON, so it is refused there rather than in every worker after model loading."""
    for name, arch in (("sft", "LlamaForCausalLM"), ("rm", "LlamaForSequenceClassification")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch], "num_labels": 1}))
    ppo = ("ppo", "-c", str(REPO / "configs" / "tiny" / "ppo.yaml"), "--dry-run", "--set", f"output_dir={tmp_path}/p",
           "--set", f"model.name_or_path={tmp_path / 'sft'}", "--set", f"reward_model.name_or_path={tmp_path / 'rm'}",
           "--set", "train.policy_lr=1e-4", "--set", "train.critic_lr=2e-4")
    res = invoke_cli(*ppo, "--set", "deepspeed.config={optimizer: {params: {lr: 1.0e-4}}}")
    assert res.exit_code == 2 and "deepspeed.config sets optimizer.params.lr=0.0001, but the YAML's learning rate " \
        "(train.lr; PPO: train.policy_lr and train.critic_lr" in res.stderr and "gives 0.0002" in res.stderr, res.output


def test_a_launcher_that_exits_0_without_publishing_final_is_a_failure(tmp_path, monkeypatch):
    """DeepSpeed's runner passes on positive exit codes only: a launch process killed by a signal made `rlhf`
    report success (and `rlhf pipeline` go on to the next stage) with no model written."""
    from rlhf_cli import app

    out = tmp_path / "o"

    def launcher(publish: bool):
        def run(cmd: list[str], env: dict[str, str]) -> int:
            if publish:
                (out / "final").mkdir()
                (out / "final" / "config.json").write_text("{}")
            return 0
        return run

    monkeypatch.setattr(app, "run_launcher", launcher(False))
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--num-gpus", "2", "--set", f"output_dir={out}")
    said = " ".join(res.stderr.split())  # (a long path wraps the line)
    assert res.exit_code == 1 and "exited with code 0 but" in said and "has no complete final/" in said, said
    monkeypatch.setattr(app, "run_launcher", launcher(True))
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--num-gpus", "2", "--set", f"output_dir={out}", "--overwrite")
    assert res.exit_code == 0, res.output
    # not where no final/ is due (PPO's train.checkpoints: false), nor on a --hostfile run, whose final/ another
    # node published (this node's view of the shared filesystem may lag)
    assert not app.publishes_final(type("C", (), {"train": type("T", (), {"checkpoints": False})()})())
    assert app.publishes_final(type("C", (), {"train": object()})())
    monkeypatch.setattr(app, "run_launcher", launcher(False))
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--hostfile", str(hosts), "--set", f"output_dir={tmp_path}/h")
    assert res.exit_code == 0, res.output


def test_a_worker_killed_by_a_signal_is_named_by_the_stage_and_the_pipeline(tmp_path, monkeypatch):
    """DeepSpeed's launch.py exits with a killed worker's return code -s, which arrives as 256 - s: say which
    signal (SIGKILL: likely the out-of-memory killer) rather than a bare "code 247"; not for 255."""
    from rlhf_cli import app
    from stages.pipeline import child_failed

    monkeypatch.setattr(app, "run_launcher", lambda cmd, env: 247)
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--num-gpus", "2", "--set", f"output_dir={tmp_path / 'o'}")
    said = " ".join(res.stderr.split())
    assert res.exit_code == 247 and "the launcher exited with code 247 (probably a process killed by SIGKILL: the " \
        "kernel's out-of-memory killer sends it (see `dmesg`)" in said, said
    assert str(child_failed("stage sft", 241, "")) == "pipeline: stage sft failed (exit code 241 (probably a " \
        "process killed by SIGTERM))"
    assert str(child_failed("stage sft", 255, "")) == "pipeline: stage sft failed (exit code 255)"  # (ssh's too)
    assert str(child_failed("stage sft", 143, "")) == "pipeline: stage sft was stopped by a signal (exit code 143)"


def test_a_stray_world_size_and_a_pipeline_under_a_launcher_are_refused_before_anything_is_written(tmp_path,
                                                                                                       monkeypatch):
    """WORLD_SIZE alone: a stage exits 2 naming the missing variables (it ended in a traceback after preparing
    output_dir); the pipeline too. With every variable set (a torchrun worker) the pipeline is refused: each
    worker would run all of it."""
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--set", f"output_dir={tmp_path}/o")
    assert res.exit_code == 2 and "WORLD_SIZE=1 is set, as in a worker of a launcher, but RANK, LOCAL_RANK" in res.stderr
    assert not (tmp_path / "o").exists()
    pipeline = str(TINY_DIR / "pipeline.yaml")
    assert invoke_cli("pipeline", "-c", pipeline, "--dry-run").exit_code == 2
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1234")):
        monkeypatch.setenv(name, value)
    res = invoke_cli("pipeline", "-c", pipeline, "--dry-run")
    assert res.exit_code == 2 and "rlhf pipeline starts each stage as a process of its own" in res.stderr


def test_one_of_several_srun_tasks_without_process_group_variables_is_refused(tmp_path, monkeypatch):
    """`srun -n 4 rlhf sft ...` with no RANK/WORLD_SIZE: each task took itself for a whole one-process run (three
    stopped on the output directory's lock, one trained on a single GPU); a task of a one-task step, or one
    that has the variables (exported from SLURM_* by the user's script), runs as before."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    res = invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/o")
    assert res.exit_code == 2 and "this is task 2 of 4 of an srun step, but RANK/LOCAL_RANK/WORLD_SIZE" in res.stderr
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert invoke_cli("sft", "-c", str(TINY_SFT), "--dry-run", "--set", f"output_dir={tmp_path}/o").exit_code == 0


def test_a_resume_without_the_runs_preset_says_which_to_give_again():
    """A PPO run started with --ppo-max, resumed without it: the change list names every key the preset set;
    the error then says which preset the run had (hand-written change lists, as config_changes spells them)."""
    from stages.checkpoint import config_changes, preset_hint

    changes = config_changes({"ppo": {"preset": "ppo-max", "kl_coef": 0.05}}, {"ppo": {"preset": "vanilla", "kl_coef": 0.1}},
                             "ppo", set())
    assert changes == ["ppo.kl_coef: 0.05 -> 0.1", "ppo.preset: 'ppo-max' -> 'vanilla'"]
    assert preset_hint(changes) == "That run used preset ppo-max (--ppo-max or --preset ppo-max, or ppo.preset in its " \
        "config): give it again. "
    assert preset_hint(["ppo.preset: 'moss-release' -> 'ppo-max'"]) == \
        "That run used preset moss-release (--preset moss-release, or ppo.preset in its config): give it again. "
    assert preset_hint(["ppo.kl_coef: 0.05 -> 0.1"]) == ""


def test_a_worker_that_loses_a_peer_says_so_in_one_line_not_a_traceback(tmp_path, monkeypatch):
    """Another rank died (killed, crashed): this rank's collective fails; its traceback would bury the real
    error, so it is one line naming the rank (the full traceback with --debug). Other errors are not hidden."""
    import rlhf_cli.app as app
    from stages.distributed import peer_lost

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6839. This is ...")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_lost(lost) and not peer_lost(RuntimeError("CUDA out of memory")) and not peer_lost(ValueError("Broken pipe"))
    # (torch's store: "Failed to recv" when rank 0, its host, died; its gloo pairs say "failed to recv")
    assert peer_lost(RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote ..."))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("PYTHON_RLHF_LAUNCHED", "1")

    def train(*args):
        raise lost

    monkeypatch.setattr(app, "_train_here", train)
    args = ("sft", "--config", str(TINY_SFT), "--set", f"output_dir={tmp_path / 'o'}")
    res = invoke_cli(*args)
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and "error (rank 1): lost contact with another process of this run, which has probably " \
        "failed" in said and "Connection closed by peer" in said and "Traceback" not in res.output
    res = invoke_cli(*args, "--debug")
    assert res.exception is lost
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process run has no peer to lose: as it is
    assert invoke_cli(*args).exception is lost


@pytest.mark.parametrize("override, message", [
    ("none=1", "unknown key 'none' (valid here: seed, output_dir,"),  # named like a pydantic type label
    ("train.list=5", "unknown key 'train.list' (valid here: epochs,"),
    ("model.str=1", "unknown key 'model.str' (valid here: name_or_path,"),
    ("data.eval={path: e.jsonl, none: 1}", "unknown key 'data.eval.none' (valid here: path, split, subset)"),  # optional
    ("data.train.pth=x", "--set data.train.pth: data.train is a str, not a mapping (a data source's keys: path, "
                         "split, subset)"),
])
def test_an_unknown_key_named_like_a_type_is_still_named(tmp_path, override, message):
    """An unknown key called `none`, `list` or `str` was taken for the label pydantic gives a union member and
    dropped from the error's location: an IndexError traceback (exit 1), or `unknown key 'train'` naming a valid
    key. A sub-key of a data source given as a path lists the keys it may have."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), [override])
    assert message in str(exc.value)


def test_a_typo_inside_a_list_of_sections_gets_the_closest_key(tmp_path):
    """`ppo_runs: [{name: a, seeed: 1}]`: the valid keys of a run entry are offered as for any section (they
    were not: the lookup stopped at the list index); `--set 'ppo_runs[0].preset=x'` says a list is set whole."""
    cfg = yaml.safe_load((TINY_DIR / "pipeline.yaml").read_text())
    cfg["ppo_runs"] = [{"name": "a", "preset": "vanilla", "seeed": 1}, {"name": "b", "none": 1}]
    for key in ("sft", "rm", "ppo"):
        cfg[key]["config"] = str(TINY_DIR / cfg[key]["config"])
    path = write_yaml(tmp_path / "pipeline.yaml", cfg)
    with pytest.raises(ConfigError, match=r"unknown key 'ppo_runs\[0\]\.seeed'; closest valid key: "
                                          r"'ppo_runs\[0\]\.seeds' \(valid here: name,") as exc:
        load_config("pipeline", path)
    assert "unknown key 'ppo_runs[1].none' (valid here: name," in str(exc.value)  # (a list's items get no labels)
    res = invoke_cli("pipeline", "-c", str(TINY_DIR / "pipeline.yaml"), "--dry-run", "--set", "ppo_runs[0].preset=x")
    assert res.exit_code == 2 and "unknown key 'ppo_runs[0]'" in res.stderr and "give the whole list" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("override, key", [("train.lr=yes", "train.lr"), ("deepspeed.zero_stage=true", "deepspeed.zero_stage"),
                                           ("train.micro_batch_size=on", "train.micro_batch_size"),
                                           ("train.adam_betas=[no, 0.95]", "train.adam_betas")])  # an item too
def test_a_boolean_where_a_number_is_wanted_is_refused(tmp_path, override, key):
    """pydantic took true/yes/on as 1 (`lr: yes` trained at lr 1.0, `zero_stage: true` ran ZeRO-1); a flag's
    boolean stays a boolean."""
    with pytest.raises(ConfigError, match=rf"{key}: a number is needed, not a boolean \(YAML reads yes/no/on/off"):
        load_config("sft", _cfg_file(tmp_path), [override])
    assert load_config("sft", _cfg_file(tmp_path), ["model.gradient_checkpointing=yes"]).model.gradient_checkpointing


def test_a_seed_is_what_torch_and_numpy_take(tmp_path):
    """A `date +%s%N` seed passed validation and overflowed at PPO's first update (seed x 1,000,003 into a 64-bit
    generator seed), or in numpy; seeds are 0 .. 2**32 - 1."""
    assert load_config("sft", _cfg_file(tmp_path), [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for bad in (2**32, -1, 1733400000000000000):
        with pytest.raises(ConfigError, match="seed: Input should be"):
            load_config("sft", _cfg_file(tmp_path), [f"seed={bad}"])


@pytest.mark.parametrize("key", ["vocab_size", "eos_token_id"])
def test_from_config_keys_the_tokenizer_sets_are_refused(tmp_path, key):
    """`from_config.vocab_size: 151936` was replaced by the 512-token trained tokenizer's length without a word,
    while the --dry-run memory estimate priced the 151,936-row vocabulary (5.5 GiB of logits for a 0.06 GiB
    model); such keys are refused, naming where the vocabulary comes from."""
    with pytest.raises(ConfigError, match=rf"from_config\.{key}: set from the tokenizer when the model is built.*"
                                          "model.tokenizer_train.vocab_size"):
        load_config("sft", _cfg_file(tmp_path), [f"model.from_config.{key}=7"])


def test_a_preset_option_and_a_set_preset_that_differ_are_refused(tmp_path):
    """`--ppo-max --set ppo.preset=vanilla` ran ppo-max without a word (the option wins over the file's
    ppo.preset, as it should, but both were on the command line); now refused, as `--ppo-max --preset vanilla`
    is. The same preset twice is no contradiction."""
    from conftest import TINY_DIR

    ppo = TINY_DIR / "ppo.yaml"
    sets = ["ppo.preset=vanilla", f"output_dir={tmp_path}", "model.name_or_path=gpt2", "reward_model.name_or_path=gpt2"]
    with pytest.raises(ConfigError, match=r"--set ppo.preset=vanilla contradicts --preset ppo-max \(or --ppo-max\)"):
        load_config("ppo", ppo, sets, preset="ppo-max")
    assert load_config("ppo", ppo, sets, preset="vanilla").ppo.preset == "vanilla"
    assert load_config("ppo", ppo, sets[1:], preset="ppo-max").ppo.preset == "ppo-max"
    # a pipeline: a run's preset beside its own `set: [ppo.preset=...]` is refused; the ppo stage's shared set
    # is a layer below the run's preset, which replaces its ppo.preset (as it does the PPO config's)
    from stages.pipeline import plan

    cfg = yaml.safe_load((TINY_DIR / "pipeline.yaml").read_text())
    for key in ("sft", "rm", "ppo"):
        cfg[key]["config"] = str(TINY_DIR / cfg[key]["config"])
    cfg["ppo_runs"] = [{"name": "a", "preset": "vanilla", "set": ["ppo.preset=ppo-max"]}]
    with pytest.raises(ConfigError, match=r"ppo_runs\[0\]\.set: ppo.preset is set by the run's preset \(vanilla\)"):
        load_config("pipeline", write_yaml(tmp_path / "p.yaml", cfg))
    cfg["ppo"]["set"], cfg["ppo_runs"] = ["ppo.preset=ppo-max"], [{"name": "max"}, {"name": "plain", "preset": "vanilla"}]
    runs = {r.label: r for r in plan(load_config("pipeline", write_yaml(tmp_path / "p.yaml", cfg)))}
    assert "ppo.preset=ppo-max" in runs["max"].overrides and runs["max"].preset is None
    assert not any(x.startswith("ppo.preset") for x in runs["plain"].overrides) and runs["plain"].preset == "vanilla"


@pytest.mark.parametrize("override, message", [
    ("ppo.policy_clip=5", "ppo.policy_clip: Input should be less than 1"),  # 1 - eps < 0: no lower clip at all
    ("generation.truncation_penalty=-5", "generation.truncation_penalty: Input should be greater than or equal to 0"),
    ("monitor.max_cap_share=50", "monitor.max_cap_share: Input should be less than or equal to 1"),  # 50 meant as %
    ("monitor.max_repetition=1.5", "monitor.max_repetition: Input should be less than or equal to 1"),
])
def test_ppo_values_that_cannot_mean_what_they_say_are_refused(tmp_path, override, message):
    """A clip epsilon of 5 (the ratio's lower clip 1 - 5 < 0), a negative truncation *penalty* (a bonus for
    truncating), a monitor share over 1 (never fires) were accepted without a word."""
    from conftest import TINY_DIR

    sets = [override, f"output_dir={tmp_path}", "model.name_or_path=gpt2", "reward_model.name_or_path=gpt2"]
    with pytest.raises(ConfigError, match=message):
        load_config("ppo", TINY_DIR / "ppo.yaml", sets)


def test_messages_for_a_null_a_false_and_a_non_mapping_say_what_to_do(tmp_path):
    """`lr:` with no value said only "should be a valid number"; `gold_reward: no` did not say that null turns
    it off; `train: 5` named pydantic's class ("instance of TrainConfig"). And under a preset, a trick key left
    null is the preset's, as when it is absent (it was "should be a valid number")."""
    from conftest import TINY_DIR

    for override, message in (("train.lr=null", "train.lr: Input should be a valid number (got null: leave the key "
                                                "out for its default)"),
                              ("output_dir=null", "output_dir: Input should be a valid string (got null: give it a "
                                                  "value)"),  # a required key has no default
                              ("train=5", "train: Input should be a mapping of its keys (got 5)")):
        with pytest.raises(ConfigError) as exc:
            load_config("sft", _cfg_file(tmp_path), [override])
        assert message in str(exc.value) and "TrainConfig" not in str(exc.value)
    sets = [f"output_dir={tmp_path}", "model.name_or_path=gpt2", "reward_model.name_or_path=gpt2"]
    with pytest.raises(ConfigError, match=r"data.gold_reward: Input should be 'toy' \(got False\); null turns it off"):
        load_config("ppo", TINY_DIR / "ppo.yaml", sets + ["data.gold_reward=no"])
    assert load_config("ppo", TINY_DIR / "ppo.yaml", sets + ["ppo.kl_coef=null"], preset="ppo-max").ppo.kl_coef == 0.05


def test_settings_a_run_would_not_act_on_are_refused_or_said(tmp_path):
    """Accepted without a word before: model.tokenizer_train with a model whose tokenizer is loaded (refused);
    train.eval_every without an eval split and logging.profile_step past the run's end (warned at the start)."""
    from conftest import TINY_DIR
    from stages.trainer import unused_settings

    sets = [f"output_dir={tmp_path}", "model.name_or_path=gpt2", "reward_model.name_or_path=gpt2"]
    with pytest.raises(ConfigError, match="model: tokenizer_train: a tokenizer is trained only for a from_config "
                                          "model without model.tokenizer"):
        load_config("ppo", TINY_DIR / "ppo.yaml", sets + ["model.tokenizer_train.vocab_size=4000"])
    cfg = load_config("sft", _cfg_file(tmp_path), ["train.eval_every=10", "logging.profile_step=5"])
    assert unused_settings(cfg, 5, has_eval=True) == []
    assert unused_settings(cfg, 4, has_eval=False, unit="iteration") == [
        "train.eval_every is 10 but there is no eval split (data.eval is unset and data.eval_fraction is 0): nothing "
        "is evaluated", "logging.profile_step is 5, past the run's last iteration (4): nothing is profiled"]


# ----------------------------------------------------------------------------------- units (mutation audit)
def test_parse_override_without_a_key_says_the_form() -> None:
    """`--set =3` names the form it expects (not an "empty component" of a key path)."""
    for item in ("=3", " =3"):
        with pytest.raises(ConfigError, match=r"^--set expects key\.path=value, got '\s?=3'$"):
            parse_override(item)


def test_a_text_file_that_cannot_be_read_is_one_error_naming_it(tmp_path: Path) -> None:
    """An OSError (here: a folder given as a file) is a ConfigError naming the file and the reason."""
    from rlhf_cli.config_loader import read_user_text

    with pytest.raises(ConfigError, match=rf"^--hostfile {tmp_path}: cannot read it \(Is a directory\)$"):
        read_user_text(tmp_path, "--hostfile")


def test_an_empty_config_file_is_an_empty_mapping_and_a_scalar_or_list_is_refused(tmp_path: Path) -> None:
    """An empty (or comments-only) file holds no keys: its errors are the missing keys, not "got NoneType"; a
    file that is a text or a list is refused naming the type."""
    from rlhf_cli.config_loader import load_yaml_file

    for text in ("", "# nothing yet\n"):
        (tmp_path / "e.yaml").write_text(text)
        assert load_yaml_file(tmp_path / "e.yaml") == {}
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        load_config("sft", tmp_path / "e.yaml")
    for text, kind in (("just a line\n", "str"), ("- a\n- b\n", "list"), ("5\n", "int")):
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(ConfigError, match=rf"s\.yaml: expected a mapping of keys at the top level, got {kind}$"):
            load_yaml_file(tmp_path / "s.yaml")


def test_apply_override_fills_a_null_section_and_names_a_ptx_source_keys() -> None:
    """A key the file left null (`eval:`) becomes a mapping; a bad sub-key of data.ptx given as a path lists a
    data source's keys, as for data.train."""
    data: dict = {"data": {"eval": None, "ptx": "p.jsonl"}}
    apply_override(data, ["data", "eval", "path"], "e.jsonl")
    assert data["data"]["eval"] == {"path": "e.jsonl"}
    apply_override(data, ["data", "ptx", "split"], "train")  # a data source's own key: the short form expands
    assert data["data"]["ptx"] == {"path": "p.jsonl", "split": "train"}
    data["data"]["ptx"] = "p.jsonl"
    with pytest.raises(ConfigError) as exc:
        apply_override(data, ["data", "ptx", "pth"], "x")
    assert str(exc.value) == ("--set data.ptx.pth: data.ptx is a str, not a mapping (a data source's keys: path, "
                              "split, subset)")
    with pytest.raises(ConfigError) as exc:  # not a data source: no such listing
        apply_override({"output_dir": "o"}, ["output_dir", "foo"], "x")
    assert str(exc.value) == "--set output_dir.foo: output_dir is a str, not a mapping"


def test_a_list_item_set_on_its_own_keeps_the_valid_keys_listing(tmp_path: Path) -> None:
    """`--set 'train[0].lr=1'`: the unknown key's message lists the valid keys and says a list is set whole."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["train[0].lr=1"])
    assert str(exc.value).endswith(
        "unknown key 'train[0]'; closest valid key: 'train' (valid here: seed, output_dir, model, train, deepspeed, "
        "logging, data); a list item cannot be set on its own: give the whole list (--set 'key=[...]') "
        "[given with --set]"), str(exc.value)


def test_only_a_false_value_says_that_null_turns_it_off(tmp_path: Path) -> None:
    """`gold_reward: 0` (or an empty text) is a wrong value, not the "no" that meant off: no null hint."""
    from conftest import TINY_DIR

    sets = [f"output_dir={tmp_path}", "model.name_or_path=gpt2", "reward_model.name_or_path=gpt2"]
    for value, shown in (("0", "0"), ("''", "''")):
        with pytest.raises(ConfigError) as exc:
            load_config("ppo", TINY_DIR / "ppo.yaml", sets + [f"data.gold_reward={value}"])
        assert f"data.gold_reward: Input should be 'toy' (got {shown}) [given with --set]" in str(exc.value)
        assert "null turns it off" not in str(exc.value)


def test_a_key_given_on_the_command_line_does_not_mark_a_longer_key_it_prefixes(tmp_path: Path) -> None:
    """`--set train.lr=...` beside a bad `train.lr_scheduler` in the file: the file's error is not marked as given
    with --set (train.lr is not train.lr_scheduler)."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path, train__lr_scheduler="bogus"), ["train.lr=0.001"])
    assert "train.lr_scheduler:" in str(exc.value) and "[given with" not in str(exc.value), str(exc.value)


def test_the_most_specific_key_given_names_its_flag(tmp_path: Path) -> None:
    """A section given with --set and a key in it given with a flag: the key's error names the flag."""
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["train={lr: 0.1}", "train.lr=many"], flags={"train.lr": "--lr"})
    assert str(exc.value).endswith("train.lr: Input should be a valid number, unable to parse string as a number "
                                   "(got 'many') [given with --lr]"), str(exc.value)


def test_a_union_error_says_each_expectation_once(tmp_path: Path) -> None:
    """The members of a union that fail alike give one line with each distinct expectation once."""
    from typing import Annotated, Union

    from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

    from rlhf_cli.config_loader import format_validation_error

    class Demo(BaseModel):
        model_config = ConfigDict(extra="forbid")
        x: Union[int, str, Annotated[str, AfterValidator(str.strip)]]  # two members say "a valid string"
        y: Union[str, int, Annotated[str, AfterValidator(str.strip)]]  # the first and the third say it

    with pytest.raises(ValidationError) as exc:
        Demo.model_validate({"x": [1], "y": [2]})
    assert format_validation_error(Demo, exc.value, "d.yaml").splitlines() == [
        "invalid config d.yaml:", "  x: Input should be a valid integer, or a valid string (got [1])",
        "  y: Input should be a valid string, or a valid integer (got a list: a text with ': ', braces or brackets "
        "is read as YAML; quote it)"]


def test_dump_config_puts_the_main_keys_first_in_the_schemas_order_after(tmp_path: Path) -> None:
    """resolved_config.yaml: seed, output_dir, model, data first, then the other sections in the schema's order
    (not alphabetical)."""
    from rlhf_cli.config_loader import dump_config

    text = dump_config(load_config("sft", _cfg_file(tmp_path)))
    assert list(yaml.safe_load(text)) == ["seed", "output_dir", "model", "data", "train", "deepspeed", "logging"]
    train = yaml.safe_load(text)["train"]
    assert list(train) == list(type(load_config("sft", _cfg_file(tmp_path)).train).model_fields)


def test_replaced_stage_sets_names_only_what_a_set_list_drops(tmp_path: Path) -> None:
    """`--set sft.set=[...]` drops the file's items it does not list (named); a --set of another key of the
    section, or a set that keeps every item, says nothing."""
    from rlhf_cli.config_loader import replaced_stage_sets

    path = write_yaml(tmp_path / "p.yaml", {"sft": {"config": "s.yaml", "set": ["train.max_steps=3", "train.lr=0.001"]},
                                            "rm": {"set": ["a=1"]}, "ppo": {"config": "p.yaml"}})
    notes = replaced_stage_sets(path, ["sft.set=[train.lr=0.001]", "sft.config=x.yaml", "rm.set=a=1",
                                       "ppo.set=[x=1]", "seed=3"])
    assert notes == ["--set sft.set replaces the file's sft.set, dropping train.max_steps=3 (list them too to keep them)"]
    assert replaced_stage_sets(path, ["sft.set=[train.lr=0.001, train.max_steps=3]"]) == []


def test_a_runs_set_given_with_the_whole_list_on_the_command_line_is_relative_to_the_current_folder(
        tmp_path: Path) -> None:
    """`--set 'ppo_runs=[{name: a, set: [data.train=rel.jsonl]}]'`: the run's set: paths were given on the command
    line, so they resolve against the current folder; from the file, against the pipeline file's folder."""
    from conftest import TINY_DIR

    cfg = yaml.safe_load((TINY_DIR / "pipeline.yaml").read_text())
    for key in ("sft", "rm", "ppo"):
        cfg[key]["config"] = str(TINY_DIR / cfg[key]["config"])
    cfg["ppo_runs"] = [{"name": "a", "set": ["data.train=rel.jsonl"]}]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    path = write_yaml(tmp_path / "cfg" / "p.yaml", cfg)
    work = tmp_path / "work"
    assert load_config("pipeline", path, [], cwd=work).ppo_runs[0].set == [f"data.train={tmp_path / 'cfg' / 'rel.jsonl'}"]
    given = load_config("pipeline", path, ["ppo_runs=[{name: a, set: [data.train=rel.jsonl]}]"], cwd=work)
    assert given.ppo_runs[0].set == [f"data.train={work / 'rel.jsonl'}"]


def test_a_data_source_key_under_a_key_that_is_no_data_source_is_refused_as_such(tmp_path: Path) -> None:
    """`--set output_dir.path=x`: only data.train/eval/ptx expand their short form; elsewhere `path` is an unknown
    sub-key of a text. Under a key the file leaves unset (model.name_or_path), the mapping the sub-key makes is
    refused with the --set named, and not with the hint to quote a text that reads as YAML."""
    with pytest.raises(ConfigError) as exc:
        apply_override({"output_dir": "o"}, ["output_dir", "path"], "x")
    assert str(exc.value) == "--set output_dir.path: output_dir is a str, not a mapping"
    with pytest.raises(ConfigError) as exc:
        load_config("sft", _cfg_file(tmp_path), ["model.name_or_path.split=x"])
    assert str(exc.value).endswith(
        "model.name_or_path: Input should be a valid string (got a mapping: --set model.name_or_path.split=... gives "
        "it a sub-key; set the text itself: --set model.name_or_path=...) [given with --set]"), str(exc.value)
