"""The training loop's plumbing, hand-computed: steps and cadence, the resume point and the checkpoint compared
with, the LR schedule and Adam settings reaching DeepSpeed, the ZeRO-0 gradient norm, the dropped-rows warning and
the logged epoch (each pinned after a mutant of it survived the suite)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stages.config import TrainConfig
from stages.trainer import check_resume_point, due, plan_steps


def test_plan_steps_global_batch_and_total():
    tc = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, epochs=1.1)
    plan = plan_steps(50, tc, world_size=2, seed=0)
    assert plan.global_batch == 12 and plan.sampler.steps_per_epoch == 4
    assert plan.total == 5  # ceil(1.1 x 4)
    assert plan_steps(50, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, max_steps=7), 2, 0).total == 7


def test_due_every_n_steps_and_at_the_end():
    assert [d for d in range(1, 11) if due(d, 3, 10)] == [3, 6, 9, 10]
    assert [d for d in range(1, 6) if due(d, 0, 5)] == [5]


def test_a_checkpoint_at_the_last_step_resumes_one_past_it_is_refused(tmp_path):
    from stages.errors import ConfigError

    check_resume_point(10, 10, tmp_path)
    with pytest.raises(ConfigError):
        check_resume_point(11, 10, tmp_path)


def test_the_engine_schedule_is_lr_factor_of_the_optimizer_step():
    from stages.engine import make_scheduler_factory

    tc = TrainConfig(lr=1.0, warmup_steps=2, lr_scheduler="linear", min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler_factory(tc, 10)(opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up (s + 1) / 2, then 0.1 + 0.9 * (1 - (s - 2) / 8)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125])


def test_adam_eps_and_betas_reach_the_deepspeed_json():
    from stages.config import DeepSpeedConfig
    from stages.engine import build_deepspeed_config

    cfg = build_deepspeed_config(TrainConfig(adam_eps=1e-6, adam_betas=(0.8, 0.9), gradient_clipping=1.0),
                                 DeepSpeedConfig(), 1, False)
    assert cfg["optimizer"]["params"]["eps"] == 1e-6 and cfg["optimizer"]["params"]["betas"] == [0.8, 0.9]
    assert cfg["gradient_clipping"] == 1.0


def test_zero0_grad_norm_is_taken_after_the_last_micro_batch():
    from conftest import GradOnlyEngine
    from stages.trainer import optimizer_step

    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    engine = GradOnlyEngine(lin, 2)
    xs = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    # d(w*x)/dw = x; DeepSpeed-style backward divides by 2: (1 + 2) / 2 = 1.5 (after the first only: 0.5)
    assert optimizer_step(engine, xs, lambda x: lin(x).sum()) == pytest.approx(1.5)


def test_resume_compares_with_the_newest_complete_checkpoint(tmp_path):
    from stages.checkpoint import resume_changes

    for step, lr in ((10, 0.1), (20, 0.2), (30, 0.3)):
        ck = tmp_path / f"checkpoint-{step:08d}"
        ck.mkdir()
        (ck / "resolved_config.yaml").write_text(f"train:\n  lr: {lr}\n")
        if step != 30:  # checkpoint 30 is incomplete
            (ck / "COMPLETE").write_text("ok\n")
    path, changes = resume_changes(tmp_path, "train:\n  lr: 0.2\n", None)
    assert path == tmp_path / "checkpoint-00000020" and changes == []


def test_dropped_warning_starts_above_ten_percent():
    from stages.trainer import dropped_warning

    tc = TrainConfig(micro_batch_size=30, gradient_accumulation_steps=1)
    assert dropped_warning(plan_steps(100, tc, 1, 0), "rows") is None  # 10 of 100 left out: exactly 10 %
    assert "11 of 101" in dropped_warning(plan_steps(101, tc, 1, 0), "rows")


def test_logged_epoch_is_steps_done_over_steps_per_epoch(tmp_path):
    from stages.distributed import ONE_PROCESS
    from stages.trainer import Run

    logged = {}
    metrics = SimpleNamespace(log=lambda done, row: logged.__setitem__(done, row))
    progress = SimpleNamespace(update=lambda *a: None)
    tc = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=8)
    run = Run("sft", tmp_path, ONE_PROCESS, tc, plan_steps(8, tc, 1, 0), object(), None, metrics, progress, 0,
              100.0, {}, 1, None, skipped=0)
    for done in (1, 4, 6):
        run.log_step(done, {"train/loss": 1.0}, tokens=10.0, seconds=1.0, shown={})
    assert [logged[d]["train/epoch"] for d in (1, 4, 6)] == [0.25, 1.0, 1.5]  # 4 steps per epoch
    assert logged[6]["train/tokens_seen"] == 130.0  # resumed at 100, + 3 x 10


def test_each_rank_seeds_its_dropout_apart(tmp_path, monkeypatch):
    """start_training seeds rank r with seed + r (dropout masks differ across ranks; the data order has its own
    generator): torch's seed after it, as ranks 0 and 1 of two."""
    from conftest import tiny_sft_dict
    from stages import engine
    from stages.config import SFTConfig
    from stages.distributed import DistInfo
    from stages.trainer import start_training

    cfg = SFTConfig.model_validate(tiny_sft_dict(tmp_path, max_steps=2))
    monkeypatch.setattr(engine, "initialize_engine", lambda *a: object())
    (tmp_path / "out").mkdir()
    seeds = []
    for rank in (0, 1):
        torch.manual_seed(12345)
        run = start_training(cfg, "sft", DistInfo(rank, rank, 2, torch.device("cpu")), tmp_path / "out", None, 64,
                             lambda ds_config: None, resume=False)
        run.metrics.close()
        seeds.append(torch.initial_seed())
    assert seeds == [cfg.seed, cfg.seed + 1]
