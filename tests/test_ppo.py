"""`rlhf ppo` end to end through the real CLI, from a tiny SFT policy and a tiny reward model trained here: the
PPO-max preset and explicit flags, both models learning, the checkpoints users deploy, exact resume, the collapse
monitor (warn vetoes best/, stop saves and exits), critic initialisation, and two DeepSpeed processes with
ZeRO-2 and ZeRO-3 (reward statistics identical on both ranks)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, invoke_cli, run_cli, write_yaml
from stages.metrics import read_metrics

TINY_PPO = REPO / "configs" / "tiny" / "ppo.yaml"
DATA = REPO / "configs" / "tiny" / "data"


@pytest.fixture(scope="module")
def stages_dir(pipeline_run) -> Path:
    """The folder holding sft/ and rm/ of the session's short tiny pipeline run (what configs/tiny/ppo.yaml
    starts from)."""
    return pipeline_run[0].parent / "runs"


def ppo_dict(tmp: Path, stages_dir: Path, name: str = "ppo", **train) -> dict:
    cfg = yaml.safe_load(TINY_PPO.read_text())
    cfg["output_dir"] = str(tmp / name)
    cfg["model"]["name_or_path"] = str(stages_dir / "sft")
    cfg["reward_model"]["name_or_path"] = str(stages_dir / "rm")
    cfg["data"]["train"] = str(DATA / "prompts.jsonl")
    del cfg["data"]["eval"]
    cfg["data"]["eval_fraction"] = 0.01  # 20 validation prompts
    cfg["generation"]["max_new_tokens"] = 12
    cfg["train"].update({"iterations": 4, "rollout_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 4,
                         "eval_every": 2, "save_every": 2, "sample_every": 2, **train})
    cfg["ppo"] = {"critic_pretrain_steps": 1}
    cfg["logging"] = {"log_every": 1, "tensorboard": False}
    return cfg


def _ppo(tmp: Path, cfg: dict, *args: str, expect: int = 0, name: str = "ppo.yaml", fault: str | None = None):
    res = run_cli("ppo", "--config", str(write_yaml(tmp / name, cfg)), *args, env={"RLHF_FAULT": fault} if fault else None)
    assert res.returncode == expect, res.stdout[-4000:] + res.stderr[-4000:]
    return Path(cfg["output_dir"]), res


def _iterations(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "objective/scores" in r]


def _events(out: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == name]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _changed(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return any(not torch.equal(wa[k], wb[k]) for k in wa if k in wb)


def test_ppo_max_run_trains_both_models_and_writes_what_users_deploy(tmp_path, stages_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = ppo_dict(tmp_path, stages_dir, eval_every=1)
    out, res = _ppo(tmp_path, cfg, "--ppo-max", "--reward-clip", "0.3", "--kl-estimator", "k3")
    # the preset fills the tricks; explicit flags (and the file's critic_pretrain_steps) win; printed and saved
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())["ppo"]
    assert resolved["preset"] == "ppo-max" and resolved["kl_coef"] == 0.05 and resolved["reward_norm"] is True
    assert resolved["reward_clip"] == 0.3 and resolved["kl_estimator"] == "k3" and resolved["lam"] == 0.9
    assert resolved["critic_pretrain_steps"] == 1 and resolved["value_clip"] == 0.2
    assert "PPO tricks (preset ppo-max" in res.stdout and "ppo.reward_clip" in res.stdout
    assert "iteration 5/5  train reward " in res.stdout  # (counted as the README and validation count them)
    lines = [line for line in res.stdout.splitlines() if re.match(r"iteration \d/5  ", line)]
    assert [line.endswith("(critic pre-training: the policy is not updated)") for line in lines] == [
        True, False, False, False, False], lines  # (log_every 1)

    rows = _iterations(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train/critic_only"] for r in rows] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert "loss/policy" not in rows[0] and all("loss/policy" in r for r in rows[1:])
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (row["step"], key)
        assert abs(row["objective/scores_transformed"]) <= 0.3 + 1e-6  # normalised, clipped to 0.3
        assert 0.0 <= row["objective/scores_transformed_std"] <= 0.3 + 1e-6
        assert 0.0 <= row["objective/gold"] <= 1.0  # data.gold_reward: toy (a mean of toy gold rewards)
    assert rows[0]["objective/kl"] == 0.0  # the policy starts as the reference
    assert rows[1]["policy/ratio"] == pytest.approx(1.0, abs=0.05)
    for key in ("rollout/perplexity", "rollout/ref_perplexity", "rollout/moss_logged_ppl", "rollout/repetition",
                "rollout/cap_share", "policy/approxkl", "policy/clipfrac", "val/clipfrac", "val/explained_variance",
                "perf/gen_tokens_per_s", "perf/train_tokens_per_s", "lr/policy", "lr/critic", "objective/kl_k3"):
        assert key in rows[-1], key
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/reward" in r] == [1, 2, 3, 4, 5]
    assert _events(out, "best")[0]["step"] >= 2  # validated, but no best/ from the critic-only iteration 1

    # the deployable policy and critic: plain transformers directories, trained away from where they started
    policy = AutoModelForCausalLM.from_pretrained(out / "final")
    assert policy.config.vocab_size >= 300
    AutoModelForSequenceClassification.from_pretrained(out / "final_critic")
    assert _changed(out / "final", stages_dir / "sft" / "final")
    assert _changed(out / "final_critic", stages_dir / "rm" / "final")
    assert (out / "best" / "config.json").is_file() and _events(out, "best")
    samples = _samples(out)
    assert {s["iteration"] for s in samples} == {1, 2, 4, 5} and all("response" in s for s in samples)  # the last too
    assert {s["policy_iteration"] for s in samples} == {0, 1, 3, 4}  # after 1 critic-only iteration, as the report
    state = json.loads((out / "checkpoint-00000005" / "trainer_state.json").read_text())
    assert state["moments"][0] == 5 * 8  # every score seen: 5 iterations x 8 rollouts
    assert state["start_length"] == rows[0]["rollout/response_length"]  # the monitor's length ratio's base


def test_kill9_at_a_random_iteration_then_resume_gives_the_same_iterations_as_an_uninterrupted_run(
    tmp_path, stages_dir
):
    """SIGKILL after a random iteration (RLHF_FAULT=kill@k, before its metrics and checkpoint); --resume
    continues from the newest complete checkpoint and reproduces the uninterrupted run exactly."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    cfg = ppo_dict(full_dir, stages_dir, save_total_limit=10, sample_every=4)
    full, _ = _ppo(full_dir, cfg, "--ppo-max")
    step = random.Random(os.environ.get("RLHF_TEST_SEED")).randrange(3, 6)
    cfg["output_dir"] = str(cut_dir / "ppo")
    cut, _ = _ppo(cut_dir, cfg, "--ppo-max", fault=f"kill@{step}", expect=-9)
    assert not (cut / "final").exists()
    _, res = _ppo(cut_dir, cfg, "--ppo-max", "--resume")
    assert f"resumed from iteration {2 * ((step - 1) // 2)}" in res.stdout, f"kill@{step}"

    def curve(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
                for r in read_metrics(out / "metrics.jsonl") if "event" not in r]

    assert curve(cut) == curve(full), f"kill@{step}"  # later iterations and validations as uninterrupted

    def events(out: Path) -> list[tuple]:
        return [(r["step"], r["event"], r.get("eval_reward")) for r in read_metrics(out / "metrics.jsonl") if "event" in r]

    # the events too (validation falls on checkpoint iterations here, so no `best` is written after the checkpoint
    # resumed from: test_a_best_written_after_the_checkpoint_is_kept_by_the_resumed_run covers that)
    assert events(cut) == events(full), f"kill@{step}"
    # the sample log too: no extra rows at the iteration the resumed run starts with
    assert (cut / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text(), f"kill@{step}"
    wa, wb = _weights(cut / "final"), _weights(full / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_reward_stops_before_the_update_or_skips_the_rollout_batch(tmp_path, stages_dir):
    """A NaN reward-model score in iteration 3 (RLHF_FAULT=nan-reward@3): stop exits 1 naming it, with the
    iteration-2 checkpoint intact and nothing later; skip makes no update in such an iteration, keeps the
    running reward statistics free of it, still validates when a validation is due and finishes with finite
    weights."""
    cfg = ppo_dict(tmp_path, stages_dir, name="stop", iterations=3, sample_every=0, eval_every=0)
    cfg["logging"]["profile_step"] = 3  # the failing iteration: its profile is still written, up to the error
    out, res = _ppo(tmp_path, cfg, fault="nan-reward@3", expect=1, name="stop.yaml")
    assert "non-finite values in the rollout of iteration 3 (rank 0: reward-model score (1 value(s)))" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002"] and not (out / "final").exists()
    assert "rlhf.rollout" in (out / "profile-step-3.txt").read_text() and (out / "profile-step-3.json.gz").is_file()

    # skip, at iterations 2 and 4 (the last): their validations (save_every 2) still run, best/ included
    cfg = ppo_dict(tmp_path, stages_dir, name="skip", iterations=3, sample_every=0, eval_every=0, on_nonfinite="skip")
    out, res = _ppo(tmp_path, cfg, fault="nan-reward@2,nan-reward@4", name="skip.yaml")
    assert [r["step"] for r in _events(out, "skipped")] == [2, 4]
    rows = {r["step"]: r for r in _iterations(out)}
    assert sorted(rows) == [1, 3] and rows[3]["train/skipped_rollouts"] == 1.0
    state = json.loads((out / "checkpoint-00000004" / "trainer_state.json").read_text())
    assert state["moments"][0] == 2 * 8 and math.isfinite(state["moments"][1])  # iterations 2 and 4 left out
    assert state["skipped_rollouts"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/reward" in r] == [2, 4]
    assert [r["step"] for r in _events(out, "best")][:1] == [2] and (out / "best").is_dir()
    assert all(torch.isfinite(w).all() for w in _weights(out / "final").values())


def test_monitor_warns_and_vetoes_best_then_stop_saves_and_exits(tmp_path, stages_dir):
    # a length threshold every iteration exceeds: the monitor fires from the start
    cfg = ppo_dict(tmp_path, stages_dir, name="warn", iterations=2, sample_every=0)
    cfg["monitor"] = {"max_length_ratio": 1e-6}
    cfg["ppo"]["critic_init"] = "policy"
    out, res = _ppo(tmp_path, cfg, name="warn.yaml")
    assert "collapse monitor at iteration" in res.stdout
    fires = _events(out, "monitor")
    assert len(fires) == 3 and "mean length" in fires[0]["reasons"][0]  # 1 critic-only + 2 iterations
    assert not (out / "best").exists() and _events(out, "best_vetoed")
    # critic_init: policy starts from a zero value head
    assert _iterations(out)[0]["val/values"] == 0.0

    cfg = ppo_dict(tmp_path, stages_dir, name="stop", iterations=3, sample_every=0, save_every=0)
    cfg["monitor"] = {"max_length_ratio": 1e-6, "action": "stop"}
    out, res = _ppo(tmp_path, cfg, name="stop.yaml", expect=1)
    assert "collapse monitor stopped the run at iteration 1" in res.stderr
    assert "continue past it with --resume --set monitor.action=warn" in res.stderr
    assert (out / "checkpoint-00000001" / "COMPLETE").is_file() and not (out / "final").exists()
    # what the message says works: monitor.* may change on --resume (the weights do not depend on it)
    out, res = _ppo(tmp_path, cfg, "--resume", "--set", "monitor.action=warn", name="stop.yaml")
    assert "resumed from iteration 1" in res.stdout and "warning: resuming with changes" not in res.stderr
    assert (out / "final" / "config.json").is_file()


def test_an_rm_trained_without_eos_reads_plain_responses_without_their_eos(tmp_path, stages_dir):
    """An RM whose record says data.add_eos: false (its rows were plain text without EOS): PPO reads the record,
    says that it scores a response that stopped at EOS without it, and runs (the scoring itself is checked
    against the RM's training rows in tests/test_ending.py)."""
    rm = tmp_path / "rm"
    shutil.copytree(stages_dir / "rm" / "final", rm)
    meta = json.loads((rm / "rlhf_checkpoint.json").read_text())
    assert meta["rendering"]["add_eos"] is True
    meta["rendering"] = {"styles": ["raw_pr"], "chat_template_sha256": None, "add_eos": False}
    (rm / "rlhf_checkpoint.json").write_text(json.dumps(meta))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"repeat sun {n} times"}) + "\n" for n in (2, 3, 4, 5) * 4))
    cfg = ppo_dict(tmp_path, stages_dir, iterations=1, sample_every=0, eval_every=0, save_every=0)
    cfg["reward_model"]["name_or_path"] = str(rm)
    cfg["data"].update({"train": str(plain), "format": "prompt", "eval_fraction": 0, "rendering_check": "off"})
    cfg["data"].pop("gold_reward", None)
    out, res = _ppo(tmp_path, cfg)
    assert ("the reward model reads a response that stopped at '<|endoftext|>' without it (as its training data "
            "ends a turn, without EOS)") in res.stdout
    assert all(math.isfinite(r["objective/scores"]) for r in _iterations(out))


def test_critic_init_reward_model_values_a_sequence_as_the_reward_model_scores_it(tmp_path, stages_dir):
    """critic_init: reward_model (the PPO-max default) starts the critic as the RM itself: its value at a
    sequence's last token is the RM's reward for the sequence (and not a zero head: critic_init policy)."""
    from rlhf_cli.config_loader import load_config
    from stages.model_paths import resolve_model_dir
    from stages.models import load_tokenizer
    from stages.ppo.models import build_critic, build_reward

    cfg = load_config("ppo", write_yaml(tmp_path / "c.yaml", ppo_dict(tmp_path, stages_dir)))
    assert cfg.ppo.critic_init == "reward_model"
    tok = load_tokenizer(resolve_model_dir(cfg.reward_model.name_or_path))
    critic = build_critic(cfg, tok, tok, {}).eval()
    reward = build_reward(cfg.reward_model, tok, cfg.deepspeed.precision, {}, cfg.seed).eval()
    ids = torch.tensor([tok.encode("Human: how do I bake bread? Assistant: mix flour and water.")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values, (rewards, _) = critic(ids, mask), reward(ids, mask)
    assert values.shape == ids.shape and rewards[0] != 0
    assert values[0, -1].item() == pytest.approx(rewards[0].item(), rel=1e-5, abs=1e-6)


def test_conflicting_preset_flags_are_refused(tmp_path, stages_dir):
    """(--ppo-max against --preset: tests/test_cli_app_units.py)"""
    cfg = ppo_dict(tmp_path, stages_dir)
    write_yaml(tmp_path / "c.yaml", cfg)
    res = invoke_cli("ppo", "--config", str(tmp_path / "c.yaml"), "--dry-run", "--preset", "moss-release")
    assert res.exit_code == 0, res.output
    assert "reward_scaling: true" in res.stdout and "kl_coef: 0.01" in res.stdout
    res = invoke_cli("ppo", "--config", str(tmp_path / "c.yaml"), "--dry-run", "--reward-scaling", "--reward-norm")
    assert res.exit_code == 2 and "reward_scaling and reward_norm are alternatives" in res.stderr
    # an explicit flag wins over the preset: scaling instead of PPO-max's normalisation
    res = invoke_cli("ppo", "--config", str(tmp_path / "c.yaml"), "--dry-run", "--ppo-max", "--reward-scaling")
    assert res.exit_code == 0, res.output
    assert "reward_scaling: true" in res.stdout and "reward_norm: false" in res.stdout


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_with_zero(tmp_path, stages_dir, zero):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=2, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2,
                   sample_every=0, eval_every=0, save_every=0)
    cfg["deepspeed"]["zero_stage"] = zero
    out, res = _ppo(tmp_path, cfg, "--ppo-max", "--num-gpus", "2")
    rows = _iterations(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["reward_stats/rank_spread"] == 0.0 for r in rows)  # statistics merged: identical on both ranks
    assert rows[-1]["reward_stats/count"] == 3 * 2 * 4  # 3 iterations x 2 ranks x 4 rollouts
    assert all(math.isfinite(r["loss/value"]) for r in rows)
    assert _changed(out / "final", stages_dir / "sft" / "final")
    assert _changed(out / "final_critic", stages_dir / "rm" / "final")


# ------------------------------------------------------------- the iteration loop pinned by mutation testing (2026-12-05)
# the prompt batch per iteration, best/ bookkeeping (also across a resume), a stop signal, the skipped micro-batch
# count, the LR schedules' lengths, one checkpoint when the monitor stops at a checkpoint, PTX across a resume

def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_each_iteration_rolls_out_new_prompts_and_best_is_the_highest_validation(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, eval_every=1, sample_every=1)
    out, _ = _ppo(tmp_path, cfg)
    batches: dict[int, list[str]] = {}
    for s in _samples(out):
        batches.setdefault(s["iteration"], []).append(s["prompt"])
    assert sorted(batches) == [1, 2, 3, 4, 5] and all(len(b) == 8 for b in batches.values())
    assert len({tuple(sorted(b)) for b in batches.values()}) == 5  # a new batch of prompts each iteration
    # best/: a `best` event exactly where a policy iteration's validation beats every earlier one (iteration 1
    # trains the critic only), and best/ holds the highest reward
    want, best = [], None
    for row in read_metrics(out / "metrics.jsonl"):
        if "eval/reward" in row and row["step"] > 1 and (best is None or row["eval/reward"] > best):
            want.append(row["step"])
            best = row["eval/reward"]
    assert [e["step"] for e in _events(out, "best")] == want
    assert json.loads((out / "best" / "rlhf_checkpoint.json").read_text())["eval_reward"] == best
    # ... and the checkpoint carries it, the reward a resumed run must beat
    assert json.loads((out / "checkpoint-00000005" / "trainer_state.json").read_text())["best_reward"] == best


def test_a_best_written_after_the_checkpoint_is_kept_by_the_resumed_run(tmp_path, stages_dir):
    """2 critic-only iterations, checkpoint at 2 (no best yet), validation every iteration: iteration 3's is the
    first best/. Killed after iteration 4 and resumed from 2, the run repeats the uninterrupted one exactly
    (metrics, events, the `best` at 3 logged again, samples without duplicates); and a best/ whose recorded
    reward the resumed run does not reach (edited up here, as on a GPU that does not repeat it) is kept."""
    def cfg_for(name: str) -> dict:
        (tmp_path / name).mkdir(exist_ok=True)
        cfg = ppo_dict(tmp_path / name, stages_dir, iterations=3, eval_every=1, save_every=2, sample_every=1,
                       save_total_limit=10)
        cfg["ppo"]["critic_pretrain_steps"] = 2
        return cfg

    full, _ = _ppo(tmp_path / "full", cfg_for("full"))
    assert [e["step"] for e in _events(full, "best")][:1] == [3]

    def rows(out):
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k not in ("time", "path")}
                for r in read_metrics(out / "metrics.jsonl")]

    cfg = cfg_for("cut")
    cut, _ = _ppo(tmp_path / "cut", cfg, fault="kill@4", expect=-9)
    assert json.loads((cut / "best" / "rlhf_checkpoint.json").read_text())["iteration"] == 3
    shutil.copytree(tmp_path / "cut", tmp_path / "higher")  # the killed run again, for the last part
    _, res = _ppo(tmp_path / "cut", cfg, "--resume")
    assert "resumed from iteration 2" in res.stdout
    assert rows(cut) == rows(full)
    assert (cut / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()

    cfg = cfg_for("higher")
    high = Path(cfg["output_dir"])
    record = high / "best" / "rlhf_checkpoint.json"
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "eval_reward": 1e9}))
    _ppo(tmp_path / "higher", cfg, "--resume")
    assert json.loads(record.read_text())["eval_reward"] == 1e9  # best/ kept: nothing reached its reward
    assert [e["step"] for e in _events(high, "best") if e["step"] > 2] == []


def test_sigterm_checkpoints_the_iteration_and_exits_143(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=3, eval_every=0, save_every=0, sample_every=0)
    out, _ = _ppo(tmp_path, cfg, fault="sigterm@2", expect=143)
    assert (out / "checkpoint-00000002" / "COMPLETE").is_file() and not (out / "final").exists()
    assert [e["step"] for e in _events(out, "stopped")] == [2]


def test_skipped_micro_batches_add_up_over_iterations(tmp_path, stages_dir):
    """nan-loss@2 and @4 (on_nonfinite: skip): the first micro-batch of every optimizer step of iterations 2 and
    4 is skipped, policy and critic: 2 mini-batches x 2 engines = 4 per iteration, counted from iteration 2."""
    cfg = ppo_dict(tmp_path, stages_dir, iterations=3, eval_every=0, save_every=0, sample_every=0,
                   on_nonfinite="skip", micro_batch_size=2)
    out, _ = _ppo(tmp_path, cfg, fault="nan-loss@2,nan-loss@4")
    counts = {r["step"]: r["train/skipped_micro_batches"] for r in _iterations(out)}
    assert counts == {1: 0.0, 2: 4.0, 3: 4.0, 4: 8.0}


def test_the_lr_schedules_span_each_engines_own_optimizer_steps(tmp_path, stages_dir):
    """Linear decay; 1 critic-only + 2 policy iterations of 2 PPO epochs x 2 mini-batches (4 steps each): the
    policy's schedule spans 2 x 4 = 8 steps, the critic's 3 x 4 = 12. Logged before each update: policy 1, 1,
    1 - 4/8; critic 1, 1 - 4/12, 1 - 8/12 (x 1e-4)."""
    cfg = ppo_dict(tmp_path, stages_dir, iterations=2, eval_every=0, save_every=0, sample_every=0,
                   lr_scheduler="linear", policy_lr=1e-4, critic_lr=1e-4)
    cfg["ppo"]["ppo_epochs"] = 2
    out, _ = _ppo(tmp_path, cfg)
    rows = _iterations(out)
    assert [r["lr/policy"] for r in rows] == pytest.approx([1e-4, 1e-4, 0.5e-4])
    assert [r["lr/critic"] for r in rows] == pytest.approx([1e-4, 1e-4 * 2 / 3, 1e-4 / 3])


def test_the_monitor_stopping_at_a_checkpoint_saves_it_once(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=2, sample_every=0, eval_every=0, save_every=1)
    cfg["monitor"] = {"max_length_ratio": 1e-6, "action": "stop"}
    out, _ = _ppo(tmp_path, cfg, expect=1)
    assert [e["step"] for e in _events(out, "checkpoint")] == [1]


def test_a_resumed_run_continues_the_ptx_data_where_it_was(tmp_path, stages_dir):
    """With PTX rows (the SFT data, ptx_coef 0.5), killed after iteration 4 and resumed from the checkpoint at 2:
    the resumed iterations draw the PTX batches the uninterrupted run drew (the same loss/ptx), since the PTX
    sampler's position is part of the checkpoint."""

    def cfg_for(name: str) -> dict:
        (tmp_path / name).mkdir(exist_ok=True)
        cfg = ppo_dict(tmp_path / name, stages_dir, iterations=4, eval_every=0, save_every=2, sample_every=0)
        cfg["data"]["ptx"] = str(DATA / "sft.jsonl")
        cfg["ppo"]["ptx_coef"] = 0.5
        return cfg

    full, _ = _ppo(tmp_path / "full", cfg_for("full"))
    cfg = cfg_for("cut")
    cut, _ = _ppo(tmp_path / "cut", cfg, fault="kill@4", expect=-9)
    _ppo(tmp_path / "cut", cfg, "--resume")
    ptx = lambda out: [(r["step"], r["loss/ptx"]) for r in _iterations(out) if "loss/ptx" in r]  # noqa: E731
    assert len(ptx(full)) == 4 and ptx(cut) == ptx(full)


def test_resuming_past_the_runs_last_iteration_is_refused(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=2, eval_every=0, save_every=0, sample_every=0)
    _ppo(tmp_path, cfg)
    cfg["train"]["iterations"] = 1
    out = Path(cfg["output_dir"])
    record = (out / "resolved_config.yaml").read_text()
    _, res = _ppo(tmp_path, cfg, "--resume", "--allow-config-change", expect=2)
    assert "past this run's last iteration 2" in res.stderr and "resumed from" not in res.stdout
    assert (out / "resolved_config.yaml").read_text() == record  # the refused attempt's own record is undone




def test_monitor_fires_are_counted_in_the_state_and_flagged_in_each_row(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=2, sample_every=0, eval_every=0, save_every=0)
    cfg["monitor"] = {"max_length_ratio": 1e-6}
    out, _ = _ppo(tmp_path, cfg)
    assert [r["monitor/firing"] for r in _iterations(out)] == [1.0, 1.0, 1.0]
    assert json.loads((out / "checkpoint-00000003" / "trainer_state.json").read_text())["monitor_fires"] == 3
    assert [e["step"] for e in _events(out, "final")] == [3]


def test_log_every_logs_every_nth_iteration_and_the_last(tmp_path, stages_dir):
    cfg = ppo_dict(tmp_path, stages_dir, iterations=4, sample_every=0, eval_every=0, save_every=0)
    cfg["logging"]["log_every"] = 2
    out, _ = _ppo(tmp_path, cfg)
    rows = _iterations(out)
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert not any("train/skipped_rollouts" in r for r in rows)  # (on_nonfinite: stop logs no skip counts)
    assert not (out / "samples.jsonl").exists()  # sample_every: 0 writes no samples at all
