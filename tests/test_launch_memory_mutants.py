"""Behaviour of rlhf_cli/launcher.py, check_worker_env, the unknown-key hint of rlhf_cli/config_loader.py and
stages/memory.py that a mutation audit found no other test pinning: each test names what it holds, against
hand-computed values (no launch, no DeepSpeed process, no model trained; subprocess monkeypatched)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rlhf_cli import launcher
from stages.errors import ConfigError
from stages.runtime import check_worker_env
from test_launcher_units import WORKER, no_gpu_env
from test_memory_units import GATED, TINY, _lm, _ppo, shapes

__all__ = ["no_gpu_env", "shapes"]  # (fixtures: imported for pytest to find)


# --------------------------------------------------------------------------------------------- launch command
@pytest.mark.usefixtures("no_gpu_env")
def test_more_nodes_than_the_hostfile_lists_is_refused(tmp_path: Path) -> None:
    """--num-nodes 3 over a hostfile of 2 hosts: DeepSpeed's runner cannot place the third node; refused
    (naming both counts) before any command is built. As many nodes as hosts is fine."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    with pytest.raises(ConfigError, match=r"^--num-nodes 3 but .*hosts lists 2 host\(s\)$"):
        launcher.launch_command("sft", tmp_path / "c.yaml", None, 3, hosts, False)
    assert launcher.launch_command("sft", tmp_path / "c.yaml", None, 2, hosts, False)[6:8] == ["--num_nodes", "2"]


@pytest.mark.usefixtures("no_gpu_env")
def test_a_multi_node_cuda_run_gives_num_gpus_not_this_nodes_visible_ids(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA workers (DS_ACCELERATOR=cuda) and CUDA_VISIBLE_DEVICES=4,5 on the launching node, a hostfile
    run still asks the runner for `--num_gpus 2` per host: this node's visible ids say nothing about the other
    nodes' GPUs (an `--include localhost:4,5` would name a host that is not in the hostfile)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", 2, None, hosts, False)
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd


@pytest.mark.usefixtures("no_gpu_env")
def test_a_multi_node_launch_prefers_the_given_master_port_to_an_inherited_one(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The master_port argument wins over MASTER_PORT in the environment (which is only the fallback)."""
    monkeypatch.setenv("MASTER_PORT", "31234")
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    cmd = launcher.launch_command("sft", tmp_path / "c.yaml", None, None, hosts, False, master_port=23456)
    assert cmd[cmd.index("--master_port") + 1] == "23456" and cmd.count("--master_port") == 1


def test_gpu_uuids_passes_over_lines_without_a_comma(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning or blank line in nvidia-smi's output (exit 0) is no `index, uuid` pair: skipped, not a
    traceback."""
    out = "WARNING: infoROM is corrupted at gpu 0000:00:04.0\n\n0, GPU-aaaa-1111\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 0, stdout=out,
                                                                                             stderr=""))
    assert launcher.gpu_uuids() == {"0": "GPU-aaaa-1111"}


def test_the_launchers_world_size_is_compared_without_surrounding_whitespace() -> None:
    """WORLD_SIZE="2\\n" (as a job script's `$(...)` may leave it) is the launcher's 2 processes: --num-gpus 2
    matches it."""
    assert launcher.check_launch_options(2, None, None, {**WORKER, "WORLD_SIZE": " 2\n"}) is None


# --------------------------------------------------------------------------------------------- worker env
def test_two_missing_process_group_variables_are_named_with_are() -> None:
    """The message's verb follows the count: two missing variables 'are not' set (one 'is', tested beside
    check_worker_env's other cases)."""
    with pytest.raises(ConfigError, match="but MASTER_ADDR, MASTER_PORT are not: unset WORLD_SIZE"):
        check_worker_env({**WORKER, "MASTER_ADDR": "", "MASTER_PORT": ""})


# --------------------------------------------------------------------------------------------- unknown keys
def test_an_unknown_key_of_nested_sections_names_every_full_path(tmp_path: Path) -> None:
    """`train.vocab_size` in a PPO config is the key of the tokenizer_train sections two levels down, under
    both model and reward_model: each is named by its full dotted path, in schema order."""
    from rlhf_cli.config_loader import load_config

    with pytest.raises(ConfigError, match="unknown key 'train.vocab_size'; it is a key of another section: "
                                          r"'model.tokenizer_train.vocab_size', "
                                          r"'reward_model.tokenizer_train.vocab_size' \(valid here"):
        load_config("ppo", TINY / "ppo.yaml", [f"output_dir={tmp_path}", "train.vocab_size=100"])


# --------------------------------------------------------------------------------------------- memory estimate
def test_an_lm_loss_block_is_at_most_loss_block_rows_positions():
    """2 rows x 4096 tokens = 8192 positions, V 50, bf16: the logits and their copies 3 x 2 bytes x 8192 x 50 =
    2457600, plus one float32 cross-entropy block of LOSS_BLOCK_ROWS = 4096 positions (not 8192) x 50 x 12 bytes
    = 2457600."""
    from stages.lm import LOSS_BLOCK_ROWS
    from stages.memory import lm_loss_logits

    assert LOSS_BLOCK_ROWS == 4096
    assert lm_loss_logits(GATED, 2, 4096, "bf16") == 2_457_600 + 2_457_600


def test_a_reward_models_lm_loss_block_is_at_most_loss_block_rows_positions(tmp_path, shapes):
    """RM with lm_coef, 2 chosen rows of 4096 tokens: one block of min(4096, 8192) positions x V 50 x 12 bytes."""
    from stages.memory import estimate

    est = estimate(_lm("train-rm", tmp_path, "loss.lm_coef=0.5", "data.max_length=4096"), 1)
    assert est["parts"]["logits"] == 4096 * 50 * 12  # 2457600


def test_sft_estimate_with_gradient_checkpointing_keeps_layer_inputs_and_one_layer(tmp_path, shapes):
    """model.gradient_checkpointing reaches the SFT / RM activations: 2 rows x 10 tokens, bf16, 2 layers of
    H 8: the layers' inputs 2 x 20 x 8 x 2 = 640 plus one gated layer in full 304 x 20 = 6080 with its mask (a bf16
    bias of 2 rows x 10^2: 400; 12960 without checkpointing)."""
    from stages.memory import estimate

    parts = estimate(_lm("sft", tmp_path, "model.gradient_checkpointing=true"), 1)["parts"]
    assert parts["activations (micro-batch)"] == 640 + 6080 + 400


def test_ppo_estimate_with_gradient_checkpointing_applies_it_to_policy_ptx_and_critic(tmp_path, shapes):
    """model.gradient_checkpointing reaches all three activation terms of PPO (bf16, micro-batches of 2 rows):
    the policy's 10 tokens, 2 layers of H 8: 2 x 20 x 8 x 2 + 304 x 20 = 640 + 6080; its PTX rows of 12
    tokens: 2 x 24 x 8 x 2 + 304 x 24 = 768 + 7296; the critic's 10 tokens, 1 layer of H 4, ungated:
    2 x 20 x 4 x 1 + 136 x 20 = 160 + 2720; each full layer with its mask, 2 bytes x 2 rows x tokens^2."""
    from stages.memory import estimate

    est = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "model.gradient_checkpointing=true",
                        f"data.ptx={TINY / 'data' / 'sft.jsonl'}", "data.ptx_max_length=12", "ppo.ptx_coef=0.5"), 1)
    parts = est["parts"]
    assert parts["activations (policy micro-batch)"] == 640 + 6080 + 400
    assert parts["activations (PTX micro-batch)"] == 768 + 7296 + 576
    assert parts["activations (critic micro-batch)"] == 160 + 2720 + 400


def test_the_peak_of_an_update_without_moments_is_its_gradients():
    """A phase with gradients and no moment adds its gradients alone to what is held (no error)."""
    from stages.memory import Phase, peak

    assert peak({"weights": 10.0, "grads": 3.0}, {"model": Phase(["grads"], {})}) == 13.0


def test_ppo_frozen_models_offloaded_to_cpu_hold_no_device_memory(tmp_path, shapes):
    """deepspeed.frozen_offload_param (frozen ZeRO-3 on CPU): the reference and the reward model weigh 0 bytes
    per rank (1000 and 600 with them partitioned over 2 ranks, as in test_memory_units), and the peak drops by
    exactly those 1600."""
    from stages.memory import estimate

    on_device = estimate(_ppo(tmp_path, "deepspeed.zero_stage=3", "deepspeed.frozen_zero_stage=3"), 2)
    est = estimate(_ppo(tmp_path, "deepspeed.zero_stage=3", "deepspeed.frozen_zero_stage=3",
                        "deepspeed.frozen_offload_param=true"), 2)
    assert (est["parts"]["reference weights"], est["parts"]["reward model weights"]) == (0, 0)
    assert on_device["total"] - est["total"] == 1000 + 600


def test_ppo_logits_cover_the_response_positions_only(tmp_path, shapes):
    """The policy's log-probs are of the 4 generated tokens per row, not the 6 + 4 of the whole sequence: with
    logprob_chunk 0 (the full-logits path), 2 rows, V 50, bf16: logits and their gradient 2 x 2 x 2 x 4 x 50 =
    1600 plus one float32 block of min(8, 2) rows x 4 x 50 x 16 = 6400."""
    from stages.memory import estimate

    parts = estimate(_ppo(tmp_path, "deepspeed.zero_stage=0", "train.logprob_chunk=0"), 1)["parts"]
    assert parts["logits (policy micro-batch)"] == 1600 + 6400
