"""The toy task's gold judge and data, `rlhf pipeline` (wiring, skip-if-complete, resume, --force, hand-off
checks, summary), `rlhf eval` and `rlhf report` on a short real pipeline run."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, invoke_cli, run_cli, write_yaml
from stages import toydata
from stages.errors import CheckpointError

TINY = REPO / "configs" / "tiny"


# --------------------------------------------------------------------------------------------- toy task
@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("count from 3 to 6", "3 4 5 6", 1.0),
        ("count from 3 to 6", "3 4 5 6 6 6", 4 / 6),  # padding costs: 4 right items of 6
        ("count from 3 to 6", "3 4 5 6 7 8 9 10", 4 / 8),  # counting on past the end
        ("count from 3 to 6", "3 4 5", 3 / 4),
        ("count from 3 to 6", "4 5 6", 0.0),  # position by position: all shifted
        ("reverse: red fox sun", "sun fox", 2 / 3),
        ("repeat moon 3 times", "moon moon moon moon", 3 / 4),
        ("what comes after 41?", "42", 1.0),
        ("spell cat", "c a t", 1.0),
        ("spell cat", "", 0.0),
        ("tell me a story", "once upon a time", 0.0),  # no toy question
        # a chat-rendered, two-question prompt: the last question counts
        ("<|user|>\nspell cat<|endoftext|><|assistant|>\nc a t<|endoftext|><|user|>\ncount from 1 to 2\n", "1 2", 1.0),
    ],
)
def test_gold_reward_hand_values(prompt, response, expected):
    assert toydata.gold_reward(prompt, response) == pytest.approx(expected)


def test_a_gold_judge_on_prompts_it_cannot_judge_warns_or_refuses():
    """The toy judge scores a prompt without a toy question 0; some such prompts: a warning with the count; all
    (HH prompts with data.gold_reward: toy): a ConfigError, not a run that logs gold 0 throughout."""
    from stages.errors import ConfigError
    from stages.gold import check_gold_prompts
    from stages.models import train_tokenizer

    tok = train_tokenizer(["count from 3 to 6", "tell me a story"] * 5, vocab_size=300, min_frequency=1)
    enc = [tok(t)["input_ids"] for t in ("count from 3 to 6", "tell me a story", "spell cat")]
    warned: list[str] = []
    check_gold_prompts("toy", tok, enc, "p.jsonl", warned.append)
    assert warned == ["warning: data.gold_reward 'toy': 1 of the 3 prompts of p.jsonl ask no question it judges; "
                      "their gold reward is 0"]
    check_gold_prompts("toy", tok, [enc[0], enc[2]], "p.jsonl", warned.append)
    assert len(warned) == 1
    with pytest.raises(ConfigError, match="'toy' judges its own task's questions and none of the 2 prompts of "
                                          "hh.jsonl asks one"):
        check_gold_prompts("toy", tok, [enc[1], enc[1]], "hh.jsonl", warned.append)


def test_toy_data_is_deterministic_and_pairs_follow_gold():
    for make in (toydata.sft_rows, toydata.preference_rows, toydata.prompt_rows):
        assert make(50, 7) == make(50, 7) and make(50, 7) != make(50, 8)
    for row in toydata.preference_rows(400, 1):
        q = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert toydata.gold_reward(q, chosen) > toydata.gold_reward(q, rejected)
        answer = toydata.solve(q)
        for text in (chosen, rejected):  # the blind spot: never the right answer padded or repeated
            items = text.split()
            assert not (len(items) > len(answer) and items[:len(answer)] == answer), (q, text)
    kinds = {r["messages"][0]["content"].split()[0] for r in toydata.prompt_rows(200, 2)}
    assert kinds == {"repeat"}  # PROMPT_KINDS


def test_held_out_questions_appear_in_no_training_file():
    """The evaluation prompts are questions no stage trained on: none is an SFT demonstration's question (any
    turn), a preference pair's or a PPO prompt; each word and count still appears in PPO's training prompts."""
    assert [toydata.held_out(q) for q in ("repeat red 5 times", "repeat blue 4 times", "repeat lamp 2 times",
                                          "repeat red 4 times", "repeat red 10 times", "spell red")] == [
        True, True, True, False, False, False]  # red = WORDS[0], blue = WORDS[1], lamp = WORDS[28]

    def questions(name):
        rows = [json.loads(line) for line in (TINY / "data" / name).read_text().splitlines()]
        return [m["content"] for r in rows for m in r.get("messages", []) + r.get("prompt", []) if m["role"] == "user"]

    for name in ("sft.jsonl", "rm.jsonl", "prompts.jsonl"):
        seen = questions(name)
        assert len(seen) >= 2000 and not [q for q in seen if toydata.held_out(q)], name
    held = set(questions("eval_prompts.jsonl"))
    assert len(held) == 24 and all(toydata.held_out(q) for q in held)
    train = set(questions("prompts.jsonl"))
    assert {q.split()[1] for q in held} <= {q.split()[1] for q in train}
    assert {q.split()[2] for q in held} == {q.split()[2] for q in train} == {"2", "3", "4", "5"}


def test_demonstrations_carry_the_stated_share_of_imperfect_answers_never_padded():
    golds = []
    for row in toydata.sft_rows(2000, 0):
        msgs = row["messages"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            golds.append(toydata.gold_reward(q["content"], a["content"]))
            answer, items = toydata.solve(q["content"]), a["content"].split()
            assert not (len(items) > len(answer) and items[:len(answer)] == answer), (q, a)
    imperfect = sum(g < 1 for g in golds) / len(golds)
    assert abs(imperfect - toydata.DEMO_NOISE) < 0.03, imperfect
    clean = [toydata.gold_reward(r["messages"][0]["content"], r["messages"][1]["content"])
             for r in toydata.sft_rows(300, 0, noise=0.0)]
    assert clean == [1.0] * 300


def test_shipped_toy_files_match_the_generator():
    for name, (make, n, seed) in toydata.SHIPPED.items():
        rows = [json.loads(line) for line in (TINY / "data" / name).read_text().splitlines()]
        assert rows == make(n, seed), name


# --------------------------------------------------------------------------------------------- plan (in-process)
def _pipeline_cfg(tmp: Path, **extra):
    from stages.config import PipelineConfig

    return PipelineConfig.model_validate({
        "output_dir": str(tmp / "runs"), "sft": {"config": str(TINY / "sft.yaml")},
        "rm": {"config": str(TINY / "rm.yaml"), "set": ["train.epochs=1"]},
        "ppo": {"config": str(TINY / "ppo.yaml")}, "eval": {"enabled": False}, "report": False, **extra,
    })


def test_pipeline_eval_greedy_reaches_rlhf_eval_and_its_recorded_settings(tmp_path):
    """eval.greedy: each evaluation's command line has --greedy (an option rlhf eval takes) and its recorded
    settings say so, so a greedy and a sampled evaluation are told apart; off, neither (the settings as written
    before the key existed)."""
    from typer.testing import CliRunner

    from rlhf_cli.app import app
    from stages.pipeline import StageAction, eval_command, eval_plan, eval_settings_of, plan

    for greedy in (False, True):
        cfg = _pipeline_cfg(tmp_path, eval={"greedy": greedy, "num_prompts": 4})
        run = next(r for r in plan(cfg) if r.stage == "ppo")
        cmd = eval_command(cfg, run, tmp_path / "sft", run.out / "final")
        assert ("--greedy" in cmd) is greedy
        settings = eval_settings_of(cfg, tmp_path / "sft", run.out / "final", run)
        assert settings.get("greedy", False) is greedy and ("greedy" in settings) is greedy
        said = eval_plan(cfg, [StageAction(run, "resume")])[0]  # the plan (--dry-run) says how it decodes
        assert said.endswith("4 prompt(s), greedy" if greedy else "4 prompt(s), seed 0"), said
    assert "--greedy" in CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).stdout


def test_a_pipeline_evaluation_of_a_run_without_data_eval_records_its_validation_share(tmp_path):
    """A PPO run whose resolved config has no data.eval is evaluated on the share of data.train it held out
    (rlhf eval's held_out): its settings record [eval_fraction, seed], so an evaluation made before (on the
    training prompts, settings without it) is not kept; with data.eval, or eval_fraction 0, no such key."""
    from stages.pipeline import eval_kept, eval_settings_of, plan

    cfg = _pipeline_cfg(tmp_path)
    run = next(r for r in plan(cfg) if r.stage == "ppo")
    run.out.mkdir(parents=True)
    recorded = yaml.safe_load((TINY / "ppo.yaml").read_text()) | {"seed": 9}
    for data_eval, fraction, share in (("e.jsonl", 0.1, None), (None, 0.1, [0.1, 9]), (None, 0, None)):
        recorded["data"].update(eval=data_eval, eval_fraction=fraction)
        (run.out / "resolved_config.yaml").write_text(yaml.safe_dump(recorded))
        settings = eval_settings_of(cfg, tmp_path / "sft", run.out / "final", run)
        assert settings.get("held_out") == share and ("held_out" in settings) is (share is not None)
    del recorded["data"]["eval_fraction"]  # (the default's share, 0.05)
    (run.out / "resolved_config.yaml").write_text(yaml.safe_dump(recorded))
    settings = eval_settings_of(cfg, tmp_path / "sft", run.out / "final", run)
    assert settings["held_out"] == [0.05, 9]
    before = {k: v for k, v in settings.items() if k != "held_out"}  # an evaluation of the training prompts
    (run.out / "eval.json").write_text("{}\n")
    (run.out / "eval.settings.json").write_text(json.dumps(before) + "\n")
    assert not eval_kept(run, settings)
    (run.out / "eval.settings.json").write_text(json.dumps(settings) + "\n")
    assert eval_kept(run, settings)


def test_a_config_error_at_a_key_the_pipeline_wires_names_the_pipeline(tmp_path):
    """An RM config with model.from_config, to which the pipeline adds model.name_or_path (the SFT output): the
    error names the pipeline as the giver, not --set."""
    from rlhf_cli.config_loader import load_config
    from stages.errors import ConfigError
    from stages.config import PIPELINE_WIRING
    from stages.pipeline import override_flags, plan

    rm_cfg = yaml.safe_load((TINY / "rm.yaml").read_text())
    rm_cfg["model"] = {"from_config": {"model_type": "llama", "hidden_size": 64}}
    rm_cfg["data"]["train"] = str(TINY / "data" / "rm.jsonl")
    rm_yaml = write_yaml(tmp_path / "rm.yaml", rm_cfg)
    sft, rm, ppo = plan(_pipeline_cfg(tmp_path, rm={"config": str(rm_yaml)}))
    said = {key: f"the pipeline ({what})" for key, what in PIPELINE_WIRING.items()}
    assert override_flags(sft) == {"output_dir": said["output_dir"]}
    assert override_flags(rm) == {k: said[k] for k in ("output_dir", "model.name_or_path")}
    assert override_flags(ppo) == said
    # a key of a set: list (here rm's train.epochs=1): the pipeline file gave it, not --set
    assert override_flags(plan(_pipeline_cfg(tmp_path))[1])["train.epochs"] == "a set: list of the pipeline"
    with pytest.raises(ConfigError, match=r"model: set exactly one of name_or_path .* and from_config: both are set .*"
                                          r"\[given with the pipeline \(the SFT stage's output\)\]$"):
        load_config(rm.stage, rm.config, rm.overrides, not_yet=rm.not_yet, flags=override_flags(rm))


def test_plan_wires_paths_and_names_runs(tmp_path):
    from stages.pipeline import plan

    cfg = _pipeline_cfg(tmp_path, ppo_runs=[{"name": "van", "preset": "vanilla", "seeds": [1, 2]},
                                            {"name": "max", "preset": "ppo-max", "set": ["train.iterations=3"]}])
    runs = plan(cfg)
    root = tmp_path / "runs"
    assert [r.label for r in runs] == ["sft", "rm", "van-seed1", "van-seed2", "max"]
    assert f"model.name_or_path={root / 'sft'}" in runs[1].overrides and "train.epochs=1" in runs[1].overrides
    ppo = runs[2]
    assert ppo.out == root / "van-seed1" and ppo.preset == "vanilla" and "seed=1" in ppo.overrides
    assert {f"model.name_or_path={root / 'sft'}", f"reward_model.name_or_path={root / 'rm'}"} <= set(ppo.overrides)
    assert "train.iterations=3" in runs[4].overrides and not any(o.startswith("seed=") for o in runs[4].overrides)
    for clash in ([{"name": "a"}, {"name": "a"}], [{"name": "a", "seeds": [1]}, {"name": "a-seed1"}],
                  [{"name": "a", "seeds": [1, 1]}], [{"name": ".."}], [{"name": "report"}]):
        with pytest.raises(ValueError, match="must be unique and not sft/rm/report"):  # one folder, two runs
            _pipeline_cfg(tmp_path, ppo_runs=clash)


@pytest.fixture
def fake_stages(monkeypatch) -> list[list[str]]:
    """The pipeline's stage processes and hand-off checks replaced: the command lines it would run."""
    import stages.pipeline as pl

    calls: list[list[str]] = []
    monkeypatch.setattr(pl, "call_forwarding_signals", lambda cmd, env=None: calls.append(cmd) or 0)
    monkeypatch.setattr(pl, "check_policy_handoff", lambda path: None)
    monkeypatch.setattr(pl, "check_reward_handoff", lambda path, sft: None)
    return calls


def test_skip_complete_resume_partial_force_reruns(tmp_path, monkeypatch, fake_stages):
    import shutil

    import stages.pipeline as pl
    from rich.console import Console

    calls = fake_stages
    cfg = _pipeline_cfg(tmp_path)
    root = tmp_path / "runs"
    (root / "sft" / "final").mkdir(parents=True)
    (root / "sft" / "final" / "config.json").write_text("{}")  # complete
    (root / "rm" / "checkpoint-00000010").mkdir(parents=True)  # partial: resumed
    (root / "ppo" / "final").mkdir(parents=True)
    (root / "ppo" / "final" / "config.json").write_text("{}")  # no final_critic/ yet (published after final/): partial
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    pl.run_pipeline(cfg, ["--num-gpus", "2"], force=False, console=quiet)
    stages = [c[c.index("rlhf_cli") + 1] for c in calls]
    assert stages == ["train-rm", "ppo"]  # sft skipped
    assert "--resume" in calls[0] and "--overwrite" not in calls[0]
    # ppo: launcher options; trained afresh, as its partial output came from the RM before this one
    assert calls[1][-3:] == ["--num-gpus", "2", "--overwrite"]
    (root / "ppo" / "final_critic").mkdir()
    (root / "ppo" / "final_critic" / "config.json").write_text("{}")
    (root / "rm" / "final").mkdir()
    (root / "rm" / "final" / "config.json").write_text("{}")
    calls.clear()
    pl.run_pipeline(cfg, [], force=False, console=quiet)
    assert calls == []  # rm and ppo now complete
    shutil.rmtree(root / "rm" / "final")
    pl.run_pipeline(cfg, [], force=True, console=quiet)
    assert [c[c.index("rlhf_cli") + 1] for c in calls] == ["sft", "train-rm", "ppo"]
    assert all("--overwrite" in c and "--resume" not in c for c in calls)
    monkeypatch.setattr(pl, "call_forwarding_signals", lambda cmd, env=None: 3)
    with pytest.raises(pl.RlhfError, match="stage rm .train-rm. failed .exit code 3.; its output is in .*; mend what "
                                           "its error above names, then run the pipeline again to resume it$") as exc:
        pl.run_pipeline(cfg, [], force=False, console=quiet)
    assert exc.value.exit_code == 1
    monkeypatch.setattr(pl, "call_forwarding_signals", lambda cmd, env=None: 2)  # a stage's config or usage error: 2 as well
    with pytest.raises(pl.RlhfError, match="stage rm .train-rm. failed .exit code 2.") as exc:
        pl.run_pipeline(cfg, [], force=False, console=quiet)
    assert exc.value.exit_code == 2
    envs: list[dict[str, str] | None] = []
    # SIGTERM: the stage saved and stopped
    monkeypatch.setattr(pl, "call_forwarding_signals", lambda cmd, env=None: envs.append(env) or 143)
    with pytest.raises(pl.RlhfError, match="was stopped by a signal .exit code 143.; its output is in .*; run the "
                                           "pipeline again to resume it$") as exc:
        pl.run_pipeline(cfg, [], force=False, console=quiet)
    assert exc.value.exit_code == 143
    # the stage was told it runs in a pipeline (its own advice on resuming names the pipeline, not --resume)
    assert envs[0] is not None and envs[0][pl.PIPELINE_STAGE_VAR] == "1" and envs[0]["PATH"] == os.environ["PATH"]


def test_a_complete_stage_whose_sft_was_retrained_under_the_same_path_is_refused(tmp_path, fake_stages):
    """A retraining pipeline run stopped after SFT leaves later complete stages trained on the old SFT: the
    next run must not reuse them silently. Their inputs.json fingerprints the SFT folder's final/."""
    import stages.pipeline as pl
    from rich.console import Console
    from stages.checkpoint import run_inputs

    cfg = _pipeline_cfg(tmp_path)
    root = tmp_path / "runs"
    for stage, parts in (("sft", ["final"]), ("rm", ["final"]), ("ppo", ["final", "final_critic"])):
        for part in parts:
            (root / stage / part).mkdir(parents=True)
            (root / stage / part / "config.json").write_text("{}")
    now = {label: yaml.safe_dump({"model": {"name_or_path": str(root / "sft")}}) for label in ("sft", "rm", "ppo")}
    for label, stage in (("sft", "sft"), ("rm", "train-rm"), ("ppo", "ppo")):
        (root / label / "resolved_config.yaml").write_text(now[label])
        (root / label / "inputs.json").write_text(json.dumps(run_inputs(root / label, now[label], stage)))
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)
    assert fake_stages == []
    (root / "sft" / "final" / "model.safetensors").write_bytes(b"retrained")  # a --force run stopped after SFT
    with pytest.raises(pl.RlhfError, match=rf"stage rm is complete .* \(model.name_or_path \({root / 'sft'}\): "
                                           r"contents changed\)"):
        pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)


def test_complete_stage_with_a_changed_config_is_refused_and_a_retrained_stage_retrains_the_later_ones(
        tmp_path, fake_stages):
    import stages.pipeline as pl
    from rich.console import Console

    calls = fake_stages
    cfg = _pipeline_cfg(tmp_path)
    root = tmp_path / "runs"
    trained = {"seed": 1, "output_dir": "a", "train": {"lr": 1e-4, "save_every": 5}}
    for stage, parts in (("sft", ["final"]), ("rm", ["final"]), ("ppo", ["final", "final_critic"])):
        for part in parts:
            (root / stage / part).mkdir(parents=True)
            (root / stage / part / "config.json").write_text("{}")
        (root / stage / "resolved_config.yaml").write_text(yaml.safe_dump(trained))
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    now = {label: yaml.safe_dump(trained) for label in ("sft", "rm", "ppo")}
    now["rm"] = yaml.safe_dump({**trained, "output_dir": "b", "train": {"lr": 1e-4, "save_every": 9}})  # free keys
    pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)
    assert calls == []  # all complete, none changed in what it trains
    now["rm"] = yaml.safe_dump({**trained, "train": {"lr": 3e-4}})
    with pytest.raises(pl.RlhfError, match=r"stage rm is complete in .*, but its config or inputs changed since it "
                                           r"was trained \(train.lr: 0.0001 -> 0.0003\); delete .* to retrain it "
                                           r"\(the stages after it are retrained too\), --force"):
        pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)
    with pytest.raises(pl.RlhfError, match=r"stage ppo is complete in .*; delete \S+ to retrain it, --force"):
        pl.run_pipeline(cfg, [], force=False, console=quiet,  # (changed: the last stage only)
                        resolved={**now, "rm": now["sft"], "ppo": now["rm"]})
    pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now, allow_changes=True)  # kept, with a warning
    assert calls == [] and "rm: kept although its config changed" in (tmp_path / "log.txt").read_text()
    # the RM deleted and retrained: the complete PPO run came from the old one, so it is trained afresh
    shutil.rmtree(root / "rm")
    pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)
    assert [(c[c.index("rlhf_cli") + 1], "--overwrite" in c, "--resume" in c) for c in calls] == [
        ("train-rm", False, False), ("ppo", True, False)]
    # SFT and RM complete, PPO interrupted: PPO resumes
    calls.clear()
    shutil.rmtree(root / "ppo" / "final_critic")
    (root / "rm" / "final").mkdir(parents=True)
    (root / "rm" / "final" / "config.json").write_text("{}")
    (root / "rm" / "resolved_config.yaml").write_text(now["rm"])
    pl.run_pipeline(cfg, [], force=False, console=quiet, resolved=now)
    assert [(c[c.index("rlhf_cli") + 1], "--overwrite" in c, "--resume" in c) for c in calls] == [("ppo", False, True)]
    # ... unless its newest checkpoint was trained with another config: refused at plan time (the plan said
    # "resumed" and the stage's own --resume refused it, after the stages before it had run), not with
    # --allow-config-change (passed on to the stage, which resumes with a warning); free keys change nothing
    calls.clear()
    shutil.rmtree(root / "ppo" / "final")
    ckpt = root / "ppo" / "checkpoint-00000002"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "resolved_config.yaml").write_text(now["ppo"])
    now["ppo"] = yaml.safe_dump({**trained, "train": {"lr": 1e-4, "save_every": 2}})
    pl.stage_actions(pl.plan(cfg), False, now)  # save_every: free
    now["ppo"] = yaml.safe_dump({**trained, "train": {"lr": 2e-4, "save_every": 5}})
    with pytest.raises(pl.ConfigError, match=r"^pipeline: stage ppo has a partial run in .* whose newest checkpoint "
                                             r"was trained with another config or inputs \(train.lr: 0.0001 -> "
                                             r"0.0002\); delete .* --allow-config-change to resume it anyway$"):
        pl.stage_actions(pl.plan(cfg), False, now)
    assert calls == []
    now["ppo"] = yaml.safe_dump({**trained, "train": {"lr": 1e-4, "save_every": 2, "micro_batch_size": 2}})
    with pytest.raises(pl.ConfigError, match=r"\(train.micro_batch_size: .* -> 2\); If that run chose "
                                             r"train.micro_batch_size with --fit-micro-batch, give it again"):
        pl.stage_actions(pl.plan(cfg), False, now)  # (a run fitted, a pipeline without the flag now)
    now["ppo"] = yaml.safe_dump({**trained, "train": {"lr": 2e-4, "save_every": 5}})
    pl.run_pipeline(cfg, ["--allow-config-change"], force=False, console=quiet, resolved=now, allow_changes=True)
    assert [("--allow-config-change" in c, "--resume" in c) for c in calls] == [(True, True)]
    # a change no resume can honour: refused in the pipeline's words, --allow-config-change or not
    (ckpt / "resolved_config.yaml").write_text(yaml.safe_dump({**trained, "train": {"mini_batch_size": 4}}))
    now["ppo"] = yaml.safe_dump({**trained, "train": {"mini_batch_size": 8}})
    for allowed in (False, True):
        with pytest.raises(pl.ConfigError, match=r"^pipeline: the partial run in .*ppo cannot be continued with "
                                                 r"train.mini_batch_size: 4 -> 8 \(the LR schedules count .*\): delete "
                                                 r".*ppo to train it afresh, or change the config back$"):
            pl.stage_actions(pl.plan(cfg), False, now, allow_changes=allowed)


def test_pipeline_redoes_an_evaluation_made_with_other_settings(tmp_path, fake_stages):
    import stages.pipeline as pl
    from rich.console import Console

    calls = fake_stages
    cfg = _pipeline_cfg(tmp_path, eval={"enabled": True, "num_prompts": 16, "seed": 5})
    run = [r for r in pl.plan(cfg) if r.stage == "ppo"]
    run[0].out.mkdir(parents=True)
    (run[0].out / "eval.json").write_text("{}")  # from an earlier run, settings unknown
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", quiet)
    assert len(calls) == 1 and calls[0][calls[0].index("--num-prompts") + 1] == "16"
    pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", quiet)
    assert len(calls) == 1  # the same settings: kept
    # ... as the plan says: kept beside a complete stage, made afresh after one that trains
    assert pl.eval_plan(cfg, [pl.StageAction(run[0], "skip")]) == [f"ppo: kept ({run[0].out / 'eval.json'}, made with "
                                                                   "these eval settings)"]
    assert pl.eval_plan(cfg, [pl.StageAction(run[0], "resume")]) == [
        f"ppo: rlhf eval of its final/ against {tmp_path / 'runs' / 'sft'}, 16 prompt(s), seed 5"]
    (run[0].out / "eval.json").write_text('{"prompts": 8}')  # an `rlhf eval` by hand, with other options, into it
    pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", quiet)
    assert len(calls) == 2  # not the pipeline's evaluation: redone
    pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", quiet)
    assert len(calls) == 2
    other = _pipeline_cfg(tmp_path, eval={"enabled": True, "num_prompts": 32, "seed": 5})
    pl.evaluate_runs(other, run, tmp_path / "runs" / "sft", quiet)
    assert len(calls) == 3 and calls[2][calls[2].index("--num-prompts") + 1] == "32"


def test_pipeline_redoes_an_evaluation_whose_inputs_changed(tmp_path, fake_stages):
    """A PPO stage kept despite changed inputs (--allow-config-change) keeps its config, whose files now hold
    other contents: its evaluation would read the new prompts, so the kept one is redone. A move of the same
    contents is no change; settings written before the inputs were recorded are kept."""
    import shutil

    import stages.pipeline as pl
    from rich.console import Console

    calls = fake_stages
    cfg = _pipeline_cfg(tmp_path, eval={"enabled": True})
    run = [r for r in pl.plan(cfg) if r.stage == "ppo"]
    out, sft = run[0].out, tmp_path / "runs" / "sft"
    out.mkdir(parents=True)
    (out / "eval.json").write_text("{}")  # (what the faked `rlhf eval` would write)
    prompts = tmp_path / "a" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text('{"prompt": "hi"}\n')
    (out / "resolved_config.yaml").write_text(yaml.safe_dump({"data": {"train": str(prompts)}}))
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    pl.evaluate_runs(cfg, run, sft, quiet)
    pl.evaluate_runs(cfg, run, sft, quiet)
    assert len(calls) == 1  # kept
    shutil.copytree(prompts.parent, tmp_path / "b")
    (out / "resolved_config.yaml").write_text(yaml.safe_dump({"data": {"train": str(tmp_path / "b" / "prompts.jsonl")}}))
    pl.evaluate_runs(cfg, run, sft, quiet)
    assert len(calls) == 1  # moved, the same contents: kept
    (tmp_path / "b" / "prompts.jsonl").write_text('{"prompt": "other"}\n')
    assert pl.eval_plan(cfg, [pl.StageAction(run[0], "skip")]) == [
        f"ppo: rlhf eval of its final/ against {sft}, all prompt(s), seed {cfg.eval.seed}"]
    pl.evaluate_runs(cfg, run, sft, quiet)
    assert len(calls) == 2  # redone
    settings = json.loads((out / "eval.settings.json").read_text())
    (out / "eval.settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "inputs"}))
    (tmp_path / "b" / "prompts.jsonl").write_text('{"prompt": "third"}\n')
    pl.evaluate_runs(cfg, run, sft, quiet)
    assert len(calls) == 2  # (settings older than the inputs record: taken as they are)


def test_pipeline_evaluates_each_runs_best_policy_when_asked(tmp_path, fake_stages):
    """eval.policy: best evaluates a run's best/ (its final/, said so, when it wrote none); which one was
    evaluated is part of the kept settings, and the summary marks the run's row."""
    import stages.pipeline as pl
    from rich.console import Console

    calls = fake_stages
    cfg = _pipeline_cfg(tmp_path, eval={"enabled": True, "policy": "best"})
    run = [r for r in pl.plan(cfg) if r.stage == "ppo"]
    out = run[0].out
    out.mkdir(parents=True)
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", Console(file=fh, width=200))
    assert calls[0][calls[0].index("eval") + 1] == str(out)  # no best/: the run's final/
    assert "ppo wrote no best/ (no validation reward chose one): its final/ is evaluated" in log.read_text()
    (out / "eval.json").write_text(json.dumps({"policy_metrics": {"reward": 1.0}, "win_rate_rm": {"win_rate": 0.7}}))
    (out / "best").mkdir()
    (out / "best" / "config.json").write_text("{}")
    with open(log, "w") as fh:
        pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", Console(file=fh, width=200))
        pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", Console(file=fh, width=200))  # kept: same policy
    assert len(calls) == 2 and calls[1][calls[1].index("eval") + 1] == str(out / "best")
    summary = pl.summary(cfg, run)
    assert summary["ppo"]["ppo"]["policy"] == "best" and "| ppo (best/) |" in pl.summary_markdown(
        {"sft_eval_loss": None, "rm_accuracy": None, **summary})
    # the default evaluates final/ even beside a best/; settings written before eval.policy existed mean final/
    final = _pipeline_cfg(tmp_path, eval={"enabled": True})
    settings = json.loads((out / "eval.settings.json").read_text())
    (out / "eval.settings.json").write_text(json.dumps({k: v for k, v in settings.items()
                                                        if k not in ("policy", "eval_json_sha256")}))
    pl.evaluate_runs(final, run, tmp_path / "runs" / "sft", Console(file=open(log, "w")))
    assert len(calls) == 2 and pl.summary(final, run)["ppo"]["ppo"]["policy"] == "final"
    # the label says what the kept evaluation judged, whatever eval.policy says now (eval.enabled: false, say)
    (out / "eval.settings.json").write_text(json.dumps(settings))
    assert pl.summary(final, run)["ppo"]["ppo"]["policy"] == "best"


def test_the_summary_publishes_only_the_pipelines_own_evaluation(tmp_path, fake_stages, monkeypatch):
    """With eval.enabled: false the summary published whatever eval.json lay in a run (an `rlhf eval` run by hand
    with other options, or a file the settings do not vouch for); it now reads eval.json only while it is the file
    the pipeline's evaluation wrote, else the run's first and last validation from metrics.jsonl (its KL too,
    not the training rollouts' objective/kl)."""
    import stages.pipeline as pl
    from rich.console import Console

    cfg = _pipeline_cfg(tmp_path, eval={"enabled": True})
    run = [r for r in pl.plan(cfg) if r.stage == "ppo"]
    out = run[0].out
    out.mkdir(parents=True)
    rows = [{"step": 1, "eval/reward": 0.25, "eval/kl": 0.0, "objective/kl": 0.3},
            {"step": 2, "eval/reward": 0.5, "eval/kl": 0.1, "objective/kl": 0.4}]  # (the training rollouts' KL)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_hand = {"policy_metrics": {"reward": 9.0, "kl": 3.0}, "baseline_metrics": {"reward": 8.0}}
    (out / "eval.json").write_text(json.dumps(by_hand))
    off = _pipeline_cfg(tmp_path, eval={"enabled": False})
    assert pl.summary(off, run)["ppo"]["ppo"]["reward"] == (0.25, 0.5)  # no eval.settings.json: not the pipeline's
    skip = [pl.StageAction(run[0], "skip")]
    assert pl.eval_plan(off, skip) == ["ppo: off (eval.enabled false); its summary row from its validation in "
                                       "metrics.jsonl (first -> last)"]
    pl.evaluate_runs(cfg, run, tmp_path / "runs" / "sft", Console(file=open(tmp_path / "log.txt", "w")))
    assert pl.summary(off, run)["ppo"]["ppo"]["reward"] == (8.0, 9.0)  # the file its evaluation wrote
    # ... which the plan, the summary table and summary.md say, with the settings it was made with
    made = f"rlhf eval of its final/ against SFT ({cfg.eval.num_prompts or 'all'} prompts, seed {cfg.eval.seed})"
    assert pl.eval_plan(off, skip) == [f"ppo: off (eval.enabled false); its summary row from {made}"]
    assert pl.summary(off, run)["ppo"]["ppo"]["source"] == made
    assert pl.summary_markdown(pl.summary(off, run)).endswith(f"\n\n- ppo: {made}\n")
    assert pl.eval_plan(off, [pl.StageAction(run[0], "retrain")])[0].endswith("its validation in metrics.jsonl "
                                                                             "(first -> last)")  # (removed then)
    (out / "eval.json").write_text(json.dumps(by_hand | {"policy_metrics": {"reward": 7.0}}))  # rewritten by hand
    row = pl.summary(off, run)["ppo"]["ppo"]
    assert row["reward"] == (0.25, 0.5) and row["kl"] == (0.0, 0.1) and row["policy"] == "final"
    # a greedy evaluation's eval.json has no KL: n/a on both sides, not 0 -> n/a
    monkeypatch.setattr(pl, "pipeline_eval", lambda run: {"policy": str(out / "final")})
    (out / "eval.json").write_text(json.dumps({"policy_metrics": {"reward": 7.0}, "decoding": "greedy"}))
    assert pl.summary(off, run)["ppo"]["ppo"]["kl"] == (None, None)


# --------------------------------------------------------------------------------------------- real run
def test_pipeline_runs_all_stages_and_summarises(pipeline_run):
    path, res = pipeline_run
    root = path.parent / "runs"
    for stage in ("sft", "rm", "ppo-max"):
        assert (root / stage / "final" / "config.json").is_file(), stage
    assert json.loads((root / "ppo-max" / "final" / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")
    summary = json.loads((root / "summary.json").read_text())
    assert math.isfinite(summary["sft_eval_loss"]) and 0.0 <= summary["rm_accuracy"] <= 1.0
    row = summary["ppo"]["ppo-max"]
    (gold_before, gold_after), (kl_before, kl_after) = row["gold"], row["kl"]
    assert 0.0 <= gold_before <= 1.0 and 0.0 <= gold_after <= 1.0 and kl_before == 0.0 and math.isfinite(kl_after)
    assert 0.0 <= row["win_rate_rm"] <= 1.0 and 0.0 <= row["win_rate_gold"] <= 1.0
    assert "PPO on the eval prompts" in res.stdout and "RM pair accuracy" in res.stdout
    assert "| ppo-max |" in (root / "summary.md").read_text()
    # the PPO run was wired to the pipeline's SFT and RM, and logged the gold reward
    resolved = yaml.safe_load((root / "ppo-max" / "resolved_config.yaml").read_text())
    assert resolved["model"]["name_or_path"] == str(root / "sft")
    assert resolved["reward_model"]["name_or_path"] == str(root / "rm") and resolved["ppo"]["preset"] == "ppo-max"
    assert any("eval/gold" in json.loads(line) for line in (root / "ppo-max" / "metrics.jsonl").read_text().splitlines())
    # eval.json: the policy and the SFT baseline on the same 16 prompts
    ev = json.loads((root / "ppo-max" / "eval.json").read_text())
    assert ev["prompts"] == 16 and ev["seed"] == 5  # the pipeline's eval.num_prompts and eval.seed
    assert set(ev["policy_metrics"]) >= {"reward", "gold", "kl", "length", "repetition"}
    samples = (root / "ppo-max" / "eval.samples.jsonl").read_text().splitlines()
    assert len(samples) == 16 and {"policy", "baseline", "policy_gold"} <= set(json.loads(samples[0]))
    pngs = list((root / "report").glob("*.png"))
    assert any(p.name == "gold_reward.png" for p in pngs) and all(p.stat().st_size > 1000 for p in pngs)


def test_rerun_skips_complete_stages(pipeline_run):
    path, _ = pipeline_run
    res = run_cli("pipeline", "--config", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("skipped (--force reruns it)") == 3


def test_handoff_checks_name_the_wrong_checkpoint(pipeline_run):
    from stages.pipeline import check_policy_handoff, check_reward_handoff

    root = pipeline_run[0].parent / "runs"
    check_policy_handoff(root / "sft")
    check_reward_handoff(root / "rm", root / "sft")
    with pytest.raises(CheckpointError, match=r"rm/final is a .*ForSequenceClassification.*not a causal LM"):
        check_policy_handoff(root / "rm")
    with pytest.raises(CheckpointError, match=r"sft/final is a .*ForCausalLM.*not a one-label sequence classifier"):
        check_reward_handoff(root / "sft", root / "sft")
    with pytest.raises(CheckpointError, match="does not load"):
        check_policy_handoff(root / "missing")


def test_eval_config_needs_only_the_paths_eval_uses(tmp_path):
    """--config lends eval its reward model, prompts and generation; the policy path in it is never loaded,
    nor are the reward model and prompts an option replaces."""
    from rlhf_cli.eval_options import eval_settings
    from stages.errors import ConfigError

    cfg = yaml.safe_load((TINY / "ppo.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tmp_path / "gone-sft")
    cfg["reward_model"]["name_or_path"] = str(tmp_path / "gone-rm")
    cfg["data"].update(train=str(tmp_path / "gone.jsonl"), eval=None)
    write_yaml(tmp_path / "ppo.yaml", cfg)
    prompts = TINY / "data" / "eval_prompts.jsonl"
    (tmp_path / "policy").mkdir()
    s = eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", reward_model="some/rm", prompts=prompts)
    assert (s.reward_model, s.data.train.path) == ("some/rm", str(prompts))
    with pytest.raises(ConfigError, match="reward_model.name_or_path: path does not exist: .*gone-rm"):
        eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", prompts=prompts)
    with pytest.raises(ConfigError, match="data.train.path: path does not exist: .*gone.jsonl"):
        eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", reward_model="some/rm")
    # --set data.* / generation.* win over the config and the options; each bad key is named as written
    s = eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", reward_model="some/rm", prompts=prompts,
                      temperature=0.5, overrides=["data.on_bad_row=skip", "generation.temperature=0.7"])
    assert (s.data.on_bad_row, s.generation.temperature, s.generation.top_p) == ("skip", 0.7, cfg["generation"]["top_p"])
    # the models' dtype: the config's precision, --precision over it, float32 without either
    assert s.dtype == {"fp32": "float32", "bf16": "bfloat16"}[cfg["deepspeed"]["precision"]]
    assert eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", reward_model="some/rm", prompts=prompts,
                         precision="bf16").dtype == "bfloat16"
    assert eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts).dtype == "float32"
    with pytest.raises(ConfigError, match=r"data.on_bad_row: Input should be 'error' or 'skip' \(got 'maybe'\) \[given with --set\]\n"
                                          r"  unknown key 'generation.top_pp'; closest valid key: 'generation.top_p'"):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts,
                      overrides=["data.on_bad_row=maybe", "generation.top_pp=1"])
    # a refused value names the option that gave it
    with pytest.raises(ConfigError, match=r"generation.temperature: Input should be greater than 0 \(got 0.0\) "
                                          r"\[given with --temperature\]$"):
        eval_settings(tmp_path / "policy", tmp_path / "ppo.yaml", reward_model="some/rm", prompts=prompts,
                      temperature=0.0)
    with pytest.raises(ConfigError, match=r"generation.top_p: .*\(got 2\) \[given with --set\]$"):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts,
                      overrides=["generation.top_p=2"])
    # --greedy is top_k 1: a --set of another top_k contradicts it (one of them would be ignored silently)
    with pytest.raises(ConfigError, match=r"^--greedy decodes with generation.top_k 1; --set generation.top_k=5 "):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, greedy=True,
                      overrides=["generation.top_k=5"])
    assert eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, greedy=True,
                         overrides=["generation.top_k=1"]).generation.top_k == 1
    # a check across keys that two options gave names both
    with pytest.raises(ConfigError, match=r"min_new_tokens \(50\) exceeds max_new_tokens \(10\) "
                                          r"\[given with --max-new-tokens, --set\]$"):
        eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, max_new_tokens=10,
                      overrides=["generation.min_new_tokens=50"])
    for item in ("train.lr=1", "data.train=x.jsonl"):
        with pytest.raises(ConfigError, match=rf"--set {item}: rlhf eval takes data.\* \(not data.train/eval"):
            eval_settings(tmp_path / "policy", None, reward_model="some/rm", prompts=prompts, overrides=[item])


def test_rm_gold_agreement_groups_each_questions_samples_and_refuses_a_shift():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rm_gold_agreement", REPO / "scripts" / "rm_gold_agreement.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    qs = ["repeat sun 2 times", "spell cat"]
    rows = [{"prompt": f"<|user|>\n{q}\n", "policy_reward": r, "policy_gold": g}
            for q, scored in zip(qs, ([(2.0, 1.0), (1.0, 0.5)], [(0.0, 0.3), (1.0, 0.3)])) for r, g in scored]
    groups = script.group_samples(rows, qs, 2)
    assert groups == [[(2.0, 1.0), (1.0, 0.5)], [(0.0, 0.3), (1.0, 0.3)]]
    assert script.gold_agreement(groups) == (1.0, 1)  # the spell pair has equal gold: not counted
    with pytest.raises(SystemExit, match="expected 4 samples, rlhf eval wrote 3"):
        script.group_samples(rows[1:], qs, 2)
    with pytest.raises(SystemExit, match="samples 0-1 are not all answers to 'repeat sun 2 times'"):
        script.group_samples(rows[1:] + rows[:1], qs, 2)
    assert [toydata.held_out(q) for q in toydata.questions(20, 0, (2,), held=True)] == [True] * 20


def test_rm_gold_agreement_script_reports_every_question_set(pipeline_run):
    """scripts/rm_gold_agreement.py (the README's RM-quality figures) runs on a pipeline's sft/ and rm/."""
    import re
    import subprocess
    import sys

    root = pipeline_run[0].parent / "runs"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "rm_gold_agreement.py"), str(root),
                          "--questions", "3", "--samples", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"RM {root / 'rm'} on samples of {root / 'sft'} (3 questions x 3 samples")
    for label in ("count", "spell", "repeat", "repeat held out"):
        line = next(x for x in lines[1:] if x.strip().startswith(label + ":"))
        m = re.search(r"(\d+\.\d)% of (\d+) pairs", line)
        assert (m and 0 <= float(m[1]) <= 100 and 1 <= int(m[2]) <= 3 * 3) or "no two responses" in line, line


def test_eval_options_seed_temperature_reference_and_batch_size(pipeline_run, tmp_path, monkeypatch):
    from rlhf_cli.eval_options import eval_settings
    from stages.evaluate import evaluate

    root = pipeline_run[0].parent / "runs"
    resolved = root / "ppo-max" / "resolved_config.yaml"

    def run(name, **opts):
        s = eval_settings(root / "ppo-max", resolved, num_prompts=12, max_new_tokens=6, **opts)
        res = evaluate(s, tmp_path / f"{name}.json")
        return s, res, (tmp_path / f"{name}.samples.jsonl").read_text()

    s, res, base = run("a", seed=1, batch_size=5)
    ppo_cfg = yaml.safe_load(resolved.read_text())
    assert (s.seed, s.batch_size, s.reward_model) == (1, 5, ppo_cfg["reward_model"]["name_or_path"])
    assert s.generation.temperature == ppo_cfg["generation"]["temperature"] and res["seed"] == 1
    kept = json.loads((tmp_path / "a.json").read_text())["settings"]  # eval.json says how it sampled
    assert (kept["batch_size"], kept["num_prompts"], kept["seed"], kept["precision"]) == (5, 12, 1, "fp32")
    assert kept["generation"]["temperature"] == ppo_cfg["generation"]["temperature"]
    assert kept["generation"]["max_new_tokens"] == 6  # and the prompts it read: the config's data.eval
    assert kept["data"]["train"] == (ppo_cfg["data"]["eval"] or ppo_cfg["data"]["train"])
    assert eval_settings(root / "ppo-max", resolved).seed == ppo_cfg["seed"]  # the config's seed by default
    assert run("b", seed=1, batch_size=5)[2] == base  # same seed, same samples
    assert run("c", seed=2, batch_size=5)[2] != base  # another seed samples other responses
    # near-greedy: the seed no longer matters
    cold = [run(f"t{k}", seed=k, temperature=1e-4)[2] for k in (1, 2)]
    assert cold[0] == cold[1] and run("t3", seed=1, temperature=1e-4, batch_size=12)[2] == cold[0]
    # KL to the policy itself is exactly 0; to the SFT policy it is not
    assert run("r", reference=str(root / "ppo-max"))[1]["policy_metrics"]["kl"] == 0.0
    assert run("s", reference=str(root / "sft"))[1]["policy_metrics"]["kl"] != 0.0
    # the reward model's record decides how a response is read: with EOS (this RM), or without (a copy whose
    # record says data.add_eos: false)
    import shutil

    from stages import evaluate as evaluate_module
    from stages.ppo import ending as ending_module

    endings = []
    real = ending_module.reward_ending
    monkeypatch.setattr(ending_module, "reward_ending", lambda *a: endings.append(real(*a)) or endings[-1])
    no_eos = tmp_path / "rm-no-eos"
    shutil.copytree(root / "rm" / "final", no_eos)
    meta = json.loads((no_eos / "rlhf_checkpoint.json").read_text())
    meta["rendering"]["add_eos"] = False
    (no_eos / "rlhf_checkpoint.json").write_text(json.dumps(meta))
    run("u")
    run("v", reward_model=str(no_eos))
    said: list[str] = []
    monkeypatch.setattr(evaluate_module, "say", lambda enabled, text: said.append(text))
    run("w", overrides=["data.rm_add_eos=false"])  # the setting wins over the record (with a warning)
    assert any("warning: data.rm_add_eos: false, but" in text for text in said), said
    run("x", reward_model=str(no_eos), overrides=["data.rm_add_eos=true"])
    assert [e.add_eos for e in endings] == [True, False, False, True]
    # more prompts asked than there are: said, all of them evaluated
    many = evaluate(eval_settings(root / "ppo-max", resolved, num_prompts=10**6, max_new_tokens=1), None)
    assert any(f"{10**6} prompts asked (--num-prompts), {many['prompts']} usable in " in text for text in said), said
    said.clear()  # exactly as many as there are: nothing to say
    assert evaluate(eval_settings(root / "ppo-max", resolved, num_prompts=many["prompts"], max_new_tokens=1),
                    None)["prompts"] == many["prompts"]
    assert not any("prompts asked" in text for text in said), said


def test_eval_ties_identical_responses_leaves_out_non_finite_scores_and_checks_its_inputs(pipeline_run, tmp_path,
                                                                                            monkeypatch):
    """Against itself as the baseline (identical responses), every prompt is a tie even when the RM scores the
    same text a float-noise apart (faked here); a NaN score leaves its prompt out of the win-rate (counted) and
    eval.json stays strict JSON; skipped prompt rows are counted; a --baseline with another tokenizer and an
    --out that is a directory are refused before any sampling."""
    import shutil

    from rlhf_cli.eval_options import eval_settings
    from stages import evaluate as evaluate_module
    from stages.errors import CheckpointError, ConfigError
    from stages.evaluate import evaluate

    root = pipeline_run[0].parent / "runs"
    resolved = root / "ppo-max" / "resolved_config.yaml"
    prompts = tmp_path / "prompts.jsonl"
    rows = (TINY / "data" / "eval_prompts.jsonl").read_text().splitlines()[:6]
    prompts.write_text("\n".join(rows[:3] + ["{not json"] + rows[3:]) + "\n")

    def settings(**opts):
        return eval_settings(root / "ppo-max", resolved, prompts=prompts, max_new_tokens=6,
                             overrides=["data.on_bad_row=skip"], **opts)

    calls = []
    real = evaluate_module.raw_scores

    def noisy(*args):
        calls.append(1)
        scores = real(*args) + 1e-6 * len(calls)  # each call a little apart, as batches of other widths can be
        scores[0] = float("nan") if len(calls) == 1 else scores[0]
        return scores

    monkeypatch.setattr(evaluate_module, "raw_scores", noisy)
    res = evaluate(settings(baseline=str(root / "ppo-max"), batch_size=3), tmp_path / "ev.json")
    assert res["prompts"] == 6 and res["skipped_rows"] == {"invalid JSON": 1}
    assert res["win_rate_rm"] == {"win_rate": 0.5, "wins": 0.0, "ties": 1.0, "losses": 0.0, "nonfinite": 1}
    text = (tmp_path / "ev.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in eval.json"))["win_rate_rm"]
    other = tmp_path / "other-tok"
    shutil.copytree(root / "sft" / "final", other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<|not-the-policys|>"])  # one more token: the policy's ids no longer name the same vocabulary
    tok.save_pretrained(other)
    calls.clear()
    with pytest.raises(CheckpointError, match=f"--baseline {other} has a different vocabulary from the policy"):
        evaluate(settings(baseline=str(other)), tmp_path / "ev2.json")
    with pytest.raises(ConfigError, match=f"--out {tmp_path} is a directory"):
        evaluate(settings(), tmp_path)
    assert calls == []  # nothing sampled or scored


def test_ppo_refuses_prompts_rendered_unlike_the_sft_and_rm_training(pipeline_run, tmp_path):
    """SFT and the RM (chat-template messages) record how they rendered their rows; PPO given the same questions
    as plain {prompt} rows without use_chat_template stops before building any model, naming both models, and
    a changed chat template is named too; the records are in the checkpoints and data reports."""
    from stages.rendering import template_digest
    from transformers import AutoTokenizer

    root = pipeline_run[0].parent / "runs"
    digest = template_digest(AutoTokenizer.from_pretrained(root / "sft" / "final"))
    for stage in ("sft", "rm"):
        meta = json.loads((root / stage / "final" / "rlhf_checkpoint.json").read_text())
        assert meta["rendering"] == {"styles": ["chat"], "chat_template_sha256": digest, "add_eos": True,
                                     "content_special_tokens": "text"}, stage
        report = json.loads((root / stage / "data_report.json").read_text())["train"]
        assert report["styles"] == {"chat": report["examples"]}, stage
    assert json.loads((root / "ppo-max" / "final" / "rlhf_checkpoint.json").read_text())["rendering"]["styles"] == [
        "chat"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"repeat sun {n} times"}) + "\n" for n in (2, 3, 4, 5) * 4))
    base = ["ppo", "--config", str(TINY / "ppo.yaml"), "--set", f"model.name_or_path={root / 'sft'}",
            "--set", f"reward_model.name_or_path={root / 'rm'}", "--set", f"data.train={plain}",
            "--set", "data.eval=null", "--set", "data.eval_fraction=0", "--set", "data.format=prompt"]
    res = run_cli(*base, "--set", f"output_dir={tmp_path / 'p1'}")  # (a process of its own: rlhf ppo sets up its
    # process group before this check, which would leave RANK, WORLD_SIZE, ... in this one)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert f"the policy (SFT) {root / 'sft' / 'final'} was trained on chat-template conversations; PPO renders " \
           "its prompts as plain prompt text" in line and "the reward model" in line, line
    assert "data.use_chat_template" in line and "data.rendering_check: warn" in line
    res = run_cli(*base, "--set", f"output_dir={tmp_path / 'p2'}", "--set", "data.use_chat_template=true",
                  "--set", 'data.chat_template="{% for m in messages %}{{ m.content }}\\n{% endfor %}"')
    assert res.returncode == 2 and "trained with another chat template than the one PPO renders" in res.stderr
    # rlhf eval makes the same check of POLICY (a PPO policy's record: SFT's styles and its prompts') and the RM
    res = invoke_cli("eval", str(root / "ppo-max"), "--reward-model", str(root / "rm"), "--prompts", str(plain))
    assert res.exit_code == 2 and f"POLICY {root / 'ppo-max' / 'final'} was trained on chat-template " \
        "conversations; rlhf eval renders its prompts as plain prompt text" in res.stderr, res.stderr[-2000:]


def test_eval_and_report_commands(pipeline_run, tmp_path):
    root = pipeline_run[0].parent / "runs"
    out = tmp_path / "ev.json"
    # models named relative to the working directory: eval.json records them absolute
    res = run_cli("eval", "ppo-max", "--reward-model", "rm", "--prompts", str(TINY / "data" / "eval_prompts.jsonl"),
                  "--gold", "toy", "--num-prompts", "8", "--max-new-tokens", "8", "--out", str(out), cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Loading weights" not in res.stdout + res.stderr  # no library progress bars in our output
    ev = json.loads(out.read_text())
    assert (ev["policy"], ev["reward_model"]) == (str(root / "ppo-max"), str(root / "rm"))
    assert ev["prompts"] == 8 and "baseline_metrics" not in ev and "kl" not in ev["policy_metrics"]
    assert 0.0 <= ev["policy_metrics"]["gold"] <= 1.0 and ev["policy_metrics"]["length"] <= 8
    # refusals, in this interpreter (an exception that escaped would be exit code 1 with it kept)
    res = invoke_cli("eval", str(root / "ppo-max"), "--num-prompts", "8")
    assert res.exit_code == 2 and "needs --prompts" in res.stderr, res.output
    # the reward model handed over as the policy: refused before loading (a process of its own, whose output
    # shows whether weights were loaded), one line, exit 1
    res = run_cli("eval", str(root / "rm"), "--reward-model", str(root / "rm"), "--prompts",
                  str(TINY / "data" / "eval_prompts.jsonl"), "--num-prompts", "8")
    assert res.returncode == 1 and "(a reward model), not a causal LM; point POLICY at" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Loading weights" not in res.stdout + res.stderr
    # a policy path that is not there, and a temperature the help says must be > 0: one line each
    res = invoke_cli("eval", str(tmp_path / "gone"), "--reward-model", str(root / "rm"), "--prompts",
                     str(TINY / "data" / "eval_prompts.jsonl"))
    assert res.exit_code == 2 and f"model {tmp_path / 'gone'}: no such file or directory" in res.stderr, res.output
    res = invoke_cli("eval", str(root / "ppo-max"), "--reward-model", str(root / "rm"), "--prompts",
                     str(TINY / "data" / "eval_prompts.jsonl"), "--temperature", "0")
    assert res.exit_code == 2 and "temperature: Input should be greater than 0 (got 0.0)" in res.stderr, res.output
    assert "pydantic" not in res.stderr
    res = run_cli("report", str(root / "ppo-max"), str(root / "sft"), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "kl.png").stat().st_size > 1000
    # missing inputs are usage errors (exit 2), one line each (in this interpreter: typer's own check)
    for args in (["report", str(tmp_path / "nowhere")], ["bench", "trace", str(tmp_path / "no.json.gz")],
                 ["eval", str(root / "ppo-max"), "--prompts", str(tmp_path / "no.jsonl")],
                 ["eval", str(root / "ppo-max"), "--config", str(tmp_path / "no.yaml")]):
        res = invoke_cli(*args)
        assert res.exit_code == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr, args


def test_pipeline_dry_run_validates_every_stage(tmp_path):
    res = run_cli("pipeline", "--config", str(TINY / "pipeline.yaml"), "--dry-run", "--num-gpus", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing trained" in res.stdout and res.stdout.count("--num-gpus 2") == 3
    # the plan says which prompts each evaluation reads: the tiny PPO config's data.eval
    assert f"seed 0, on data.eval {TINY / 'data' / 'eval_prompts.jsonl'}" in " ".join(res.stdout.split())
    bad = yaml.safe_load((TINY / "pipeline.yaml").read_text())
    bad.update(sft={"config": str(TINY / "sft.yaml"), "set": ["train.lr=-1"]}, rm={"config": str(TINY / "rm.yaml")},
               ppo={"config": str(TINY / "ppo.yaml")})
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "p.yaml", bad)), "--dry-run")  # in-process
    assert res.exit_code == 2 and "train.lr" in res.stderr and "Traceback" not in res.stderr
    assert f"pipeline {tmp_path / 'p.yaml'}, stage sft ({TINY / 'sft.yaml'} with the pipeline's overrides)" in res.stderr
    # an output_dir that is a file: one line before any stage, from the dry run as from the run
    (tmp_path / "afile").write_text("")
    res = invoke_cli("pipeline", "--config", str(TINY / "pipeline.yaml"), "--dry-run", "--set",
                     f"output_dir={tmp_path / 'afile'}")
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: output_dir {tmp_path / 'afile'} is a file, not a directory [given with --set]"], res.output
    # every stage's keys before any stage's from_config architecture (whose check imports transformers): a typo in
    # the last stage is said before a refused architecture in the first, which is said once the rest is valid
    arch = dict(bad, sft={"config": str(TINY / "sft.yaml"), "set": ["model.from_config.hiden_size=32"]},
                ppo_runs=[{"name": "p", "set": ["train.bogus=1"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "a.yaml", arch)), "--dry-run")
    assert res.exit_code == 2 and "stage p (" in res.stderr and "unknown key 'train.bogus'" in res.stderr, res.output
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "a.yaml", dict(arch, ppo_runs=[{"name": "p"}]))),
                     "--dry-run")
    assert res.exit_code == 2 and "stage sft (" in res.stderr and "from_config.hiden_size: not a llama config key" \
        in res.stderr, res.output
    # the stage commands' --resume: not a pipeline option (hidden), refused saying how a pipeline resumes
    res = invoke_cli("pipeline", "--config", str(TINY / "pipeline.yaml"), "--resume")
    assert res.exit_code == 2 and "rlhf pipeline has no --resume: run the same command again" in res.stderr, res.output
    assert "--resume" not in invoke_cli("pipeline", "--help").stdout
    # a stage's set: path is relative to the pipeline file (here beside it), wherever the pipeline runs from
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "prompts.jsonl").write_text((TINY / "data" / "prompts.jsonl").read_text())
    good = dict(bad, sft={"config": str(TINY / "sft.yaml")},
                ppo_runs=[{"name": "p", "set": ["data.train=mine/prompts.jsonl", "model.dtype=float32"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "p.yaml", good)), "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"--set data.train={tmp_path / 'mine' / 'prompts.jsonl'} --set model.dtype=float32" in res.stdout
    # ... also inside a list or a mapping
    for given, made in (("[mine/prompts.jsonl]", f"[{tmp_path / 'mine' / 'prompts.jsonl'}]"),
                        ("{path: mine/prompts.jsonl}", f"{{path: {tmp_path / 'mine' / 'prompts.jsonl'}}}")):
        listed = dict(good, ppo_runs=[{"name": "p", "set": [f"data.train={given}"]}])
        res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "p.yaml", listed)), "--dry-run")
        assert res.exit_code == 0 and f"data.train={made}" in res.stdout.replace("'", ""), res.output
    # what the pipeline wires (output folders, the RM's and PPO's model paths) is not a stage's to set
    wired = dict(good, ppo_runs=[{"name": "p", "set": [f"reward_model.name_or_path={tmp_path}"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "w.yaml", wired)), "--dry-run")
    assert res.exit_code == 2 and "ppo_runs[0].set: reward_model.name_or_path sets reward_model.name_or_path, " \
        "which the pipeline wires (the RM stage's output)" in res.stderr, res.output
    # ... nor through a mapping above it, which would replace it whole
    wired = dict(good, ppo_runs=[{"name": "p", "set": [f"reward_model={{name_or_path: {tmp_path}}}"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "w.yaml", wired)), "--dry-run")
    assert res.exit_code == 2 and "ppo_runs[0].set: reward_model sets reward_model.name_or_path, which the " \
        "pipeline wires" in res.stderr, res.output
    # a run's seeds decide its seed: a set: seed beside them would be silently overridden
    seeded = dict(good, ppo_runs=[{"name": "p", "seeds": [1, 2], "set": ["seed=5"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "w.yaml", seeded)), "--dry-run")
    assert res.exit_code == 2 and "ppo_runs[0].set: seed is set by the run's seeds ([1, 2])" in res.stderr, res.output
    # without data.eval a run is evaluated on the share of data.train it holds out (its seed splits it), with
    # data.eval_fraction 0 on the prompts it trains on: the plan says which
    shares = dict(good, ppo_runs=[{"name": "held", "seeds": [7], "set": ["data.eval=null"]},
                                  {"name": "all", "set": ["data.eval=null", "data.eval_fraction=0"]}])
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "w.yaml", shares)), "--dry-run")
    said = [line.removeprefix("eval ") for line in res.stdout.splitlines() if line.startswith("eval ")]
    assert res.exit_code == 0 and len(said) == 2, res.output
    train = TINY / "data" / "prompts.jsonl"
    assert said[0].startswith("held-seed7: rlhf eval of its final/") and said[0].endswith(
        f"on the validation share of data.train {train} (data.eval_fraction 0.05, seed 7)"), said
    assert said[1].endswith(f"on data.train {train} (data.eval_fraction 0: the prompts it trains on)"), said
    # ... but a set: given with --set on the command line is relative to the current directory, as --set paths are
    import os

    sft_data = tmp_path / "mine" / "sft.jsonl"
    sft_data.write_text((TINY / "data" / "sft.jsonl").read_text())
    res = invoke_cli("pipeline", "--config", str(tmp_path / "p.yaml"), "--dry-run",
                     "--set", f"sft.set=[data.train={os.path.relpath(sft_data)}]")
    assert res.exit_code == 0, res.output
    assert f"--set data.train={sft_data}" in res.stdout, res.stdout
    # ... and replaces the file's whole set: list, as a --set of any list does: said, naming what it drops
    kept = dict(good, sft={"config": str(TINY / "sft.yaml"), "set": ["train.max_steps=3", "train.lr=0.001"]})
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "k.yaml", kept)), "--dry-run",
                     "--set", f"sft.set=[data.train={os.path.relpath(sft_data)}, train.lr=0.001]")
    assert res.exit_code == 0 and "warning: --set sft.set replaces the file's sft.set, dropping train.max_steps=3 (list " \
        "them too to keep them)" in " ".join(res.stderr.split()), res.output
    assert "train.max_steps=3" not in res.stdout


def test_check_data_prints_what_each_stage_of_the_pipeline_read(pipeline_run, tmp_path):
    """`--check-data` on each stage config the session's pipeline ran, pointed at fresh output folders: SFT (its
    tokenizer trained in memory again) and the RM print exactly the lines of their runs' data_report.json, and
    the runs' step counts (train.max_steps 60 and 40); PPO reads the 2000 training and 128 validation prompts
    with both tokenizers and the rendering records checked, and plans 1 critic-only + 2 rollouts of 8 prompts
    (250 per pass);
    nothing is written."""
    from stages.data import DataReport
    from stages.reward import describe_pairs
    from stages.sft import describe_report

    root = pipeline_run[0].parent / "runs"
    for stage, command, describe, plan in (("sft", "sft", describe_report, "steps: 60 optimizer steps of 16 rows"),
                                           ("rm", "train-rm", describe_pairs, "steps: 40 optimizer steps of 16 pairs")):
        fresh = tmp_path / stage
        res = invoke_cli(command, "--config", str(root / stage / "resolved_config.yaml"), "--check-data",
                         "--set", f"output_dir={fresh}")
        assert res.exit_code == 0, res.output
        for split, body in json.loads((root / stage / "data_report.json").read_text()).items():
            assert describe(split, DataReport(**body)) in res.stdout, (split, res.stdout[-2000:])
        assert plan in res.stdout and not fresh.exists(), res.stdout[-2000:]
    fresh = tmp_path / "ppo"
    res = invoke_cli("ppo", "--config", str(root / "ppo-max" / "resolved_config.yaml"), "--check-data",
                     "--set", f"output_dir={fresh}")
    assert res.exit_code == 0, res.output
    assert "prompts: 2000 train, 128 validation; 0 of data.train's prompts cut to 64 tokens" in res.stdout, res.stdout[-2000:]
    assert "rollouts: 3 (1 critic-only + 2 iterations) of 8 prompts each; 250 per pass over the training " \
           "prompts (1 rank(s))" in res.stdout
    assert "prompts: 2000 train, 128 validation" in pipeline_run[1].stdout  # what the PPO run printed
    assert not fresh.exists()


def test_pipeline_check_data_reads_every_stage_before_any_exists(tmp_path):
    """`rlhf pipeline --check-data` on a fresh pipeline: SFT's data is read and tokenized with the tokenizer its
    run would train; the RM's and PPO's with what SFT and the RM would hand on (stand-ins in a temporary folder),
    so a bad RM row (row 61 of 61) stops the check, named by file and row, after SFT's report, and PPO prompts
    rendered unlike SFT's training rows (plain text vs chat template) are refused by the rendering check that
    needs SFT's record; nothing is written in the pipeline's folder."""
    rows = (TINY / "data" / "rm.jsonl").read_text().splitlines(keepends=True)[:60]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(rows) + json.dumps({"chosen": "only one side"}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"repeat sun {n} times"}) + "\n" for n in range(40)))
    cfg = yaml.safe_load((TINY / "pipeline.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "runs"), sft={"config": str(TINY / "sft.yaml")},
               rm={"config": str(TINY / "rm.yaml"), "set": [f"data.train={pairs}"]},
               ppo={"config": str(TINY / "ppo.yaml")})
    path = write_yaml(tmp_path / "p.yaml", cfg)
    res = invoke_cli("pipeline", "--config", str(path), "--check-data")
    assert res.exit_code == 1 and f"{pairs} row 61: " in res.stderr, res.output
    assert "train data: 1900 examples;" in res.stdout and not (tmp_path / "runs").exists()
    rm_set = [f"data.train={pairs}", "data.on_bad_row=skip", "train.micro_batch_size=8"]
    res = invoke_cli("pipeline", "--config", str(path), "--check-data", "--set", f"rm.set=[{','.join(rm_set)}]")
    assert res.exit_code == 0, res.output
    assert "train data: 54 pairs;" in res.stdout and "eval data: 6 pairs;" in res.stdout, res.stdout[-3000:]
    assert "prompts: 2000 train, 128 validation" in res.stdout and "the data too; nothing trained" in res.stdout
    ppo_set = [f"data.train={plain}", "data.eval=null", "data.eval_fraction=0", "data.format=prompt"]
    res = invoke_cli("pipeline", "--config", str(path), "--check-data", "--set", f"rm.set=[{','.join(rm_set)}]",
                     "--set", f"ppo.set=[{','.join(ppo_set)}]")
    assert res.exit_code == 2 and "pipeline stage ppo-max: data: the policy (SFT) " in res.stderr, res.output
    assert f"{tmp_path / 'runs' / 'sft'} (which this run trains first: what it would hand on) was trained on " \
           "chat-template conversations; PPO renders its prompts as plain prompt text" in res.stderr, res.stderr
    assert "rlhf-check-data-" not in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("complete, force, real", [
    ((), False, ()),                      # a fresh pipeline: the RM and PPO read stand-ins
    (("sft", "rm"), False, ("sft", "rm")),  # both kept: read as they are
    (("sft",), False, ("sft",)),          # the RM still to train: PPO reads the real SFT and the RM's stand-in
    (("rm",), False, ()),                 # SFT retrained, so the complete RM is retrained too
    (("sft", "rm"), True, ()),            # --force retrains both
])
def test_pipeline_check_data_stands_in_for_each_stage_the_pipeline_will_train(tmp_path, monkeypatch, complete, force,
                                                                              real):
    """Which earlier outputs each stage's data check reads, as `run_pipeline` decides what it retrains: a complete
    stage it keeps is read as it is; one it will (re)train is replaced by its stand-in (what its check returned)."""
    from rlhf_cli.config_loader import load_config
    from stages.pipeline import check_pipeline_data, plan, stage_actions

    root = tmp_path / "runs"
    for stage in complete:
        (root / stage / "final").mkdir(parents=True)
        (root / stage / "final" / "config.json").write_text("{}")
    runs = plan(load_config("pipeline", TINY / "pipeline.yaml", [f"output_dir={root}"]))
    read: dict[str, list[str]] = {}

    class Tokenizer:
        def save_pretrained(self, folder: str) -> None:
            Path(folder).mkdir()

    def check(stage: str, given: tuple[str, list[str]], world_size: int) -> object:
        label, overrides = given
        read[label] = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].endswith("name_or_path")]
        return None if stage == "ppo" else (Tokenizer(), {"styles": ["chat"]})

    import stages.pipeline as pl

    monkeypatch.setattr(pl, "check_data", check)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    check_pipeline_data(stage_actions(runs, force), 1, lambda run, overrides: (run.label, overrides), lambda _: None,
                        scratch)
    expect = {name: str(root / name if name in real else scratch / name) for name in ("sft", "rm")}
    assert read == {"sft": [], "rm": [expect["sft"]], "ppo-max": [expect["sft"], expect["rm"]]}
    for name in {"sft", "rm"} - set(real):  # a stand-in holds the rendering record its stage's check returned
        assert json.loads((scratch / name / "rlhf_checkpoint.json").read_text()) == {"rendering": {"styles": ["chat"]}}


def test_the_summary_reads_what_eval_json_writes_for_a_non_finite_value():
    """eval.json is strict JSON: a NaN mean is written "nan"; the pipeline's summary shows it as n/a (it raised
    a ValueError formatting the string)."""
    from stages.pipeline import _fmt, _run_cells

    assert [_fmt(v) for v in (0.5, 2, None, float("nan"), "nan", "-inf", True)] == ["0.500", "2.000"] + ["n/a"] * 5
    row = {"reward": ("nan", 0.25), "gold": (None, None), "kl": (0.0, "inf"), "length": (3, 4), "win_rate_rm": "nan"}
    assert _run_cells(row, 2, " -> ", " / ") == ["n/a -> 0.25", "n/a -> n/a", "0.00 -> n/a", "3.00 -> 4.00",
                                                  "n/a / n/a"]


def test_pipeline_dry_run_plans_each_stage_as_the_run_would_and_refuses_a_changed_complete_one(tmp_path):
    """The dry run said "every config is valid" where the run then stopped at once (a complete stage whose
    config changed since it was trained); it now prints each stage's action and refuses alike (exit 2)."""
    cfg = dict(yaml.safe_load((TINY / "pipeline.yaml").read_text()), output_dir=str(tmp_path / "runs"),
               sft={"config": str(TINY / "sft.yaml")}, rm={"config": str(TINY / "rm.yaml")},
               ppo={"config": str(TINY / "ppo.yaml")})
    path = write_yaml(tmp_path / "p.yaml", cfg)
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run")
    assert res.exit_code == 0 and "sft (trained):" in res.stdout and "rm (trained):" in res.stdout, res.output
    sft = tmp_path / "runs" / "sft"
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "config.json").write_text("{}")
    from rlhf_cli.config_loader import dump_config, load_config

    trained = dump_config(load_config("sft", TINY / "sft.yaml", [f"output_dir={sft}", "train.lr=0.5"]))
    (sft / "resolved_config.yaml").write_text(trained)  # trained with another lr
    (tmp_path / "runs" / "rm").mkdir()
    (tmp_path / "runs" / "rm" / "metrics.jsonl").write_text("")  # a partial RM run
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run")
    assert res.exit_code == 2 and "stage sft is complete in" in res.stderr, res.output
    assert "train.lr: 0.5 ->" in " ".join(res.stderr.split()), res.stderr
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run", "--allow-config-change")
    assert res.exit_code == 0, res.output
    assert "sft (complete, skipped although its config changed)" in res.stdout
    assert "rm (partial output: resumed):" in res.stdout and "--resume" in res.stdout
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run", "--force")
    assert res.exit_code == 0 and res.stdout.count("(trained afresh (--force))") == 2
    shutil.rmtree(sft / "final")  # SFT partial: resumed, so the RM (which has output) is trained afresh
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run", "--allow-config-change")
    assert res.exit_code == 0 and "rm (trained afresh (an earlier stage is retrained)):" in res.stdout, res.output


# ------------------------------------------------------------- pinned by mutation testing (2026-12-05): stage actions,
# completeness, config records, the order of --set items, flags per action, the hand-off checks and their calls

def _complete(out: Path, *parts: str) -> None:
    for part in parts:
        (out / part).mkdir(parents=True)
        (out / part / "config.json").write_text("{}")


def test_a_retrained_reward_model_retrains_every_ppo_run_after_it(tmp_path):
    from stages.pipeline import plan, stage_actions

    cfg = _pipeline_cfg(tmp_path, ppo_runs=[{"name": "a"}, {"name": "b"}, {"name": "c"}])
    root = tmp_path / "runs"
    _complete(root / "sft", "final")
    for label in ("a", "b", "c"):
        _complete(root / label, "final", "final_critic")
    assert [(act.run.label, act.action) for act in stage_actions(plan(cfg), force=False)] == [
        ("sft", "skip"), ("rm", "train"), ("a", "retrain"), ("b", "retrain"), ("c", "retrain")]


def test_a_stage_is_complete_only_with_a_loadable_final(tmp_path):
    from stages.pipeline import is_complete

    out = tmp_path / "ppo"
    (out / "final").mkdir(parents=True)
    (out / "final_critic").mkdir()
    assert not is_complete(out, "sft") and not is_complete(out, "ppo")  # folders without config.json
    (out / "final" / "config.json").write_text("{}")
    assert is_complete(out, "sft") and not is_complete(out, "ppo")
    (out / "final_critic" / "config.json").write_text("{}")
    assert is_complete(out, "ppo")


def test_a_complete_stage_without_a_config_record_or_with_a_newer_key_at_its_default_is_unchanged(tmp_path):
    """An output older than resolved_config.yaml has nothing to compare; a key a newer rlhf added, at its
    default, is no change (the stage's schema decides the default)."""
    from stages.pipeline import stage_config_changes

    out = tmp_path / "ppo"
    _complete(out, "final", "final_critic")
    now = {"seed": 1, "data": {"train": "p.jsonl", "rendering_check": "error"}}
    assert stage_config_changes(out, yaml.safe_dump(now), "ppo") == []
    (out / "resolved_config.yaml").write_text("not a mapping\n")  # an unreadable record: nothing to compare
    assert stage_config_changes(out, yaml.safe_dump(now), "ppo") == []
    (out / "resolved_config.yaml").write_text(yaml.safe_dump({"seed": 1, "data": {"train": "p.jsonl"}}))
    assert stage_config_changes(out, yaml.safe_dump(now), "ppo") == []
    assert stage_config_changes(out, yaml.safe_dump({**now, "seed": 2}), "ppo") == ["seed: 1 -> 2"]


def test_a_complete_stage_whose_inputs_moved_with_the_project_is_unchanged(tmp_path):
    """A pipeline output_dir moved or copied whole (its stages' inputs at new paths, the same contents) is kept,
    as a stage's own --resume keeps it; the path to a file of other contents is a change."""
    import json
    import shutil

    from stages.checkpoint import run_inputs
    from stages.pipeline import stage_config_changes

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "p.jsonl").write_text('{"prompt": "hi"}\n')
    out = tmp_path / "ppo"
    _complete(out, "final", "final_critic")
    before = yaml.safe_dump({"seed": 1, "data": {"train": str(tmp_path / "a" / "p.jsonl")}})
    (out / "resolved_config.yaml").write_text(before)
    (out / "inputs.json").write_text(json.dumps(run_inputs(out, before, "ppo")))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    now = yaml.safe_dump({"seed": 1, "data": {"train": str(tmp_path / "b" / "p.jsonl")}})
    assert stage_config_changes(out, now, "ppo") == []
    (tmp_path / "b" / "p.jsonl").write_text('{"prompt": "yo"}\n')
    assert stage_config_changes(out, now, "ppo") == [f"data.train: '{tmp_path / 'a' / 'p.jsonl'}' -> "
                                                     f"'{tmp_path / 'b' / 'p.jsonl'}'"]


def test_pipeline_dry_run_estimates_each_stage_memory_before_the_stages_it_reads_have_trained(pipeline_run, tmp_path):
    """`rlhf pipeline --dry-run` prints each stage's estimated peak per rank and its fit to --gpu-memory. The RM
    and PPO read models SFT and the RM have yet to write: they are estimated with those stages' architecture (their
    own loading settings kept), which gives the peaks their own --dry-run gives once SFT and the RM exist (here
    pipeline_run's); a stage the pipeline skips is read as it is, and a complete pipeline prints no memory part."""
    import stages.pipeline as pl
    from rlhf_cli.config_loader import load_config
    from rlhf_cli.gpu_memory import estimate_quietly
    from stages.memory import GIB

    path, _ = pipeline_run
    done = load_config("pipeline", path, [])
    runs = pl.plan(done)
    loaded = {r.label: load_config(r.stage, r.config, r.overrides, preset=r.preset, not_yet=r.not_yet,
                                   flags=pl.override_flags(r)) for r in runs}
    real = {label: estimate_quietly(cfg, 1)["total"] for label, cfg in loaded.items()}  # SFT's, RM's config.json
    assert real["rm"] != real["sft"] != real["ppo-max"]
    # nothing trained yet: every stage is estimated, the later ones with the architecture of the earlier ones
    fresh = dict(yaml.safe_load(path.read_text()), output_dir=str(tmp_path / "runs"))
    gpu = (real["sft"] + real["rm"]) / 2 / 0.9 / GIB  # (the SFT peak fits 90 % of it, the RM's does not)
    res = invoke_cli("pipeline", "--config", str(write_yaml(tmp_path / "p.yaml", fresh)), "--dry-run",
                     "--gpu-memory", str(gpu))
    assert res.exit_code == 0, res.output
    lines = {line.split(":")[0]: line for line in res.stdout.splitlines() if " GiB per rank" in line}
    assert set(lines) == {"sft", "rm", "ppo-max"}, res.stdout
    for label, stand_ins in (("sft", ""), ("rm", " (with the model architecture of sft, which this run trains first)"),
                             ("ppo-max", " (with the model architecture of sft and rm, which this run trains first)")):
        micro = loaded[label].train.micro_batch_size
        assert lines[label].startswith(f"{label}: peak {real[label] / GIB:.3f} GiB per rank at micro-batch {micro}"
                                       f"{stand_ins}; "), lines
    assert "; fits (" in lines["sft"] and "; does not fit (" in lines["rm"]
    # a hub model's SFT: every architecture key reaches the RM and PPO, each keeping its own loading settings
    hub = loaded["sft"].model.model_copy(update={"from_config": None, "name_or_path": "Org/Base",
                                                 "tokenizer": "Org/Tokenizer", "trust_remote_code": True})
    rm = loaded["rm"].model_copy(update={"model": loaded["rm"].model.model_copy(update={"gradient_checkpointing": True})})
    got = pl.estimate_configs([pl.StageAction(r, "train") for r in runs],
                              {**loaded, "sft": loaded["sft"].model_copy(update={"model": hub}), "rm": rm})
    for label, key in (("rm", "model"), ("ppo-max", "model"), ("ppo-max", "reward_model")):
        section = getattr(got[label][0], key)
        assert [getattr(section, k) for k in pl.ARCHITECTURE_KEYS] == [getattr(hub, k) for k in pl.ARCHITECTURE_KEYS]
    assert got["rm"][0].model.gradient_checkpointing is True and got["ppo-max"][1] == ["sft", "rm"]
    # SFT complete (skipped): the RM reads its model as it is, PPO's reward model still stands in for the RM
    actions = [pl.StageAction(runs[0], "skip"), pl.StageAction(runs[1], "train"), pl.StageAction(runs[2], "train")]
    got = pl.estimate_configs(actions, {**loaded, "rm": rm})
    assert set(got) == {"rm", "ppo-max"} and got["rm"] == (rm, [])
    ppo, stand_ins = got["ppo-max"]
    assert stand_ins == ["rm"] and ppo.model == loaded["ppo-max"].model
    assert ppo.reward_model.name_or_path == rm.model.name_or_path != loaded["ppo-max"].reward_model.name_or_path
    assert ppo.reward_model.gradient_checkpointing is False  # PPO's own setting for its reward model, not the RM's
    # a complete pipeline trains nothing: no memory part
    res = invoke_cli("pipeline", "--config", str(path), "--dry-run")
    assert res.exit_code == 0 and "memory per rank" not in res.stdout, res.output


def test_plan_puts_the_wiring_first_and_a_runs_own_preset_and_sets_over_the_shared_ones(tmp_path):
    """Later --set items win: the user's stage sets follow the wiring, a run's own sets follow the ppo stage's,
    and a run's preset drops the stage's ppo.preset set."""
    from stages.pipeline import plan

    cfg = _pipeline_cfg(tmp_path, ppo={"config": str(TINY / "ppo.yaml"),
                                       "set": ["ppo.preset=vanilla", "train.iterations=2"]},
                        ppo_runs=[{"name": "m", "preset": "ppo-max", "set": ["train.iterations=3"]}, {"name": "v"}])
    root = tmp_path / "runs"
    sft, rm, m, v = plan(cfg)
    assert rm.overrides == [f"output_dir={root / 'rm'}", f"model.name_or_path={root / 'sft'}", "train.epochs=1"]
    wired = [f"model.name_or_path={root / 'sft'}", f"reward_model.name_or_path={root / 'rm'}"]
    assert m.overrides == [f"output_dir={root / 'm'}", *wired, "train.iterations=2", "train.iterations=3"]
    assert m.preset == "ppo-max"
    assert v.overrides == [f"output_dir={root / 'v'}", *wired, "ppo.preset=vanilla", "train.iterations=2"]


def test_stage_command_passes_allow_config_change_only_to_a_resume(tmp_path):
    from stages.pipeline import StageRun, stage_command

    run = StageRun("rm", "train-rm", Path("/c/rm.yaml"), Path("/r/rm"), ["output_dir=/r/rm"])
    launch = ["--num-gpus", "2", "--allow-config-change"]
    assert stage_command(run, launch, resume=False, overwrite=True)[-3:] == ["--num-gpus", "2", "--overwrite"]
    assert stage_command(run, launch, resume=True, overwrite=False)[-4:] == [
        "--num-gpus", "2", "--allow-config-change", "--resume"]


def _handoff(root: Path, name: str, vocab: int, tokens: dict, arch: str, num_labels: int = 1, **special) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    final = root / name / "final"
    LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                architectures=[arch], num_labels=num_labels).save_pretrained(final)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(tokens, unk_token="a")), **special)
    tok.save_pretrained(final)
    return root / name


def test_handoff_checks_refuse_a_wrong_architecture_tokenizer_or_label_count(tmp_path):
    from stages.errors import CheckpointError
    from stages.pipeline import check_policy_handoff, check_reward_handoff

    words = {"a": 0, "b": 1, "<eos>": 2, "<pad>": 3}
    special = {"eos_token": "<eos>", "pad_token": "<pad>"}
    sft = _handoff(tmp_path, "sft", 4, words, "LlamaForCausalLM", **special)  # len(tok) == vocab: fine
    check_policy_handoff(sft)
    rm = _handoff(tmp_path, "rm", 4, words, "LlamaForSequenceClassification", **special)
    check_reward_handoff(rm, sft)
    with pytest.raises(CheckpointError, match="not a causal LM"):
        check_policy_handoff(rm)
    with pytest.raises(CheckpointError, match="tokenizer has 4 tokens, the model 3 embeddings"):
        check_policy_handoff(_handoff(tmp_path, "small", 3, words, "LlamaForCausalLM", **special))
    with pytest.raises(CheckpointError, match="no EOS or pad token"):
        check_policy_handoff(_handoff(tmp_path, "nopad", 4, words, "LlamaForCausalLM", eos_token="<eos>"))
    with pytest.raises(CheckpointError, match="with 2 labels, not a one-label"):
        check_reward_handoff(_handoff(tmp_path, "two", 4, words, "LlamaForSequenceClassification", 2, **special), sft)
    other = _handoff(tmp_path, "other", 5, {**words, "c": 4}, "LlamaForSequenceClassification", **special)
    with pytest.raises(CheckpointError):  # another vocabulary than the SFT model's
        check_reward_handoff(other, sft)


def test_each_stage_checks_the_output_it_receives_before_it_starts(tmp_path, monkeypatch):
    import stages.pipeline as pl
    from rich.console import Console

    checked: list[tuple] = []
    monkeypatch.setattr(pl, "call_forwarding_signals", lambda cmd, env=None: 0)
    monkeypatch.setattr(pl, "check_policy_handoff", lambda path: checked.append(("policy", path)))
    monkeypatch.setattr(pl, "check_reward_handoff", lambda path, sft: checked.append(("reward", path, sft)))
    root = tmp_path / "runs"
    root.mkdir()
    pl.run_pipeline(_pipeline_cfg(tmp_path), [], force=False, console=Console(file=open(tmp_path / "log", "w")))
    assert checked == [("policy", root / "sft"), ("reward", root / "rm", root / "sft")]
