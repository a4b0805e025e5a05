"""LR schedule, DeepSpeed config building, batching of steps across ranks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from stages.config import DeepSpeedConfig, TrainConfig
from stages.engine import build_deepspeed_config, lr_factor, warmup_steps_for
from stages.errors import ConfigError
from stages.trainer import EpochSampler, rank_micro_batches


def test_lr_factor_hand_computed():
    # T = 10 steps, W = 2 warm-up steps, cosine to m = 0.1
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0  # (s + 1) / W
    assert f[2] == pytest.approx(1.0)  # p = 0
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # p = 4/8 -> 0.55
    assert f[6] == pytest.approx(0.55)
    lin = [lr_factor(s, 10, 2, "linear", 0.0) for s in range(10)]
    assert lin[2] == 1.0 and lin[6] == pytest.approx(0.5) and lin[9] == pytest.approx(1 / 8)
    assert [lr_factor(s, 10, 2, "constant", 0.0) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 10, 0, "cosine", 0.0) == 1.0  # no warm-up


def test_warmup_steps_from_ratio_or_explicit():
    assert warmup_steps_for(TrainConfig(warmup_ratio=0.1), 55) == 6
    assert warmup_steps_for(TrainConfig(warmup_ratio=0.1, warmup_steps=3), 55) == 3
    assert warmup_steps_for(TrainConfig(warmup_steps=100), 55) == 55


def test_epoch_sampler_shuffles_each_epoch_anew_and_drops_the_partial_batch():
    """10 rows, global batch 4, seed 3: 2 steps per epoch, 2 rows left out; step s reads slice s % 2 of the
    permutation seeded 3 + s // 2 (a fresh order each epoch), whatever steps were asked before (resume)."""
    sampler = EpochSampler(10, 4, seed=3)
    assert (sampler.steps_per_epoch, sampler.left_out) == (2, 2)
    perms = [torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist() for e in range(3)]
    got = [sampler.indices(s) for s in range(6)]
    assert got == [perms[e][k * 4:(k + 1) * 4] for e in range(3) for k in range(2)]
    assert all(len(b) == 4 for b in got) and got[0] != [0, 1, 2, 3]  # full batches, shuffled
    assert len(set(got[0] + got[1])) == 8 and got[0] + got[1] != got[2] + got[3]  # an epoch's rows, a new order
    assert EpochSampler(10, 4, seed=3).indices(5) == got[5]  # a resumed run's first step
    assert sampler.indices(1) == got[1]  # back to an earlier epoch


def test_rank_micro_batches_lay_a_global_batch_out_as_accumulation_then_ranks_then_micro():
    batch = list(range(12))  # accumulation 2 x world 2 x micro 3
    assert rank_micro_batches(batch, 0, 2, 3, 2) == [[0, 1, 2], [6, 7, 8]]
    assert rank_micro_batches(batch, 1, 2, 3, 2) == [[3, 4, 5], [9, 10, 11]]
    assert rank_micro_batches(batch, 0, 1, 3, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_holdout_split_takes_the_rounded_fraction_and_leaves_a_training_row():
    from stages.trainer import split_holdout

    rows = list(range(10))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    train, held = split_holdout(rows, 0.29, seed=7)  # round(2.9) = 3 rows, the permutation's first
    assert held == sorted(perm[:3]) and train == [r for r in rows if r not in perm[:3]]
    assert [len(part) for part in split_holdout(rows, 0.99, seed=7)] == [1, 9]  # at least one row each side
    assert [len(part) for part in split_holdout(rows, 0.01, seed=7)] == [9, 1]


def test_deepspeed_config_from_yaml_sections():
    train = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=3, lr=2e-5, gradient_clipping=0.5,
                        weight_decay=0.1)
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True, precision="bf16")
    cfg = build_deepspeed_config(train, ds, world_size=8, on_gpu=True)
    assert cfg["train_batch_size"] == 4 * 3 * 8
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"]["enabled"] is False
    # DeepSpeed's throughput timer (a device sync before every forward) is off; our perf/* metrics time phases
    assert cfg["timers"] == {"throughput": {"enabled": False}}
    assert cfg["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    plain = build_deepspeed_config(TrainConfig(gradient_clipping=0), DeepSpeedConfig(precision="fp16"), 1, False)
    assert plain["gradient_clipping"] == 0 and "offload_optimizer" not in plain["zero_optimization"]
    assert plain["fp16"]["enabled"] is True
    # no GPU: torch's AdamW (bit-exact resume); with optimizer offload DeepSpeed's CPU Adam stays in charge
    assert plain["optimizer"]["params"]["torch_adam"] is True and "torch_adam" not in cfg["optimizer"]["params"]
    offloaded = build_deepspeed_config(TrainConfig(), DeepSpeedConfig(zero_stage=2, offload_optimizer=True), 1, False)
    assert "torch_adam" not in offloaded["optimizer"]["params"]


def test_raw_deepspeed_json_is_merged_last(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True}))
    cfg = build_deepspeed_config(TrainConfig(), DeepSpeedConfig(zero_stage=2, config=str(raw)), 2, False)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["wall_clock_breakdown"] is True
    inline = build_deepspeed_config(TrainConfig(), DeepSpeedConfig(config={"steps_per_print": 5}), 1, False)
    assert inline["steps_per_print"] == 5


def test_raw_deepspeed_json_may_not_contradict_the_yaml():
    ds = DeepSpeedConfig(config={"train_micro_batch_size_per_gpu": 99})
    with pytest.raises(ConfigError, match="set it in the YAML instead"):
        build_deepspeed_config(TrainConfig(micro_batch_size=4), ds, 1, False)
    same = DeepSpeedConfig(config={"train_micro_batch_size_per_gpu": 4})
    assert build_deepspeed_config(TrainConfig(micro_batch_size=4), same, 1, False)["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("yaml_ds, raw, message", [
    # the ZeRO stage, precision and offload are acted on by our own code (ZeRO-3's sampling copy, dtypes, estimate)
    ({}, {"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3, but deepspeed.zero_stage gives 0"),
    ({}, {"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4, but train.gradient_accumulation_steps "
                                             "(PPO: train.mini_batch_size / train.micro_batch_size) gives 1"),
    ({}, {"zero_optimization": {"stage": "3"}}, "zero_optimization.stage='3', but deepspeed.zero_stage gives 0"),
    ({}, {"zero_optimization": True}, "zero_optimization=True: give a mapping"),
    ({"precision": "bf16"}, {"bf16": {"enabled": False}}, "bf16.enabled=False, but deepspeed.precision gives bf16"),
    ({"precision": "bf16"}, {"bf16": {"enabled": "maybe"}}, "bf16.enabled='maybe': not a boolean"),
    ({"precision": "fp32"}, {"fp16": {"enabled": True}}, "fp16.enabled=True, but deepspeed.precision gives fp32"),
    ({"zero_stage": 3}, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer.device='cpu', but deepspeed.offload_optimizer is false"),
    ({"zero_stage": 3, "offload_param": True}, {"zero_optimization": {"offload_param": {"device": "none"}}},
     "offload_param.device='none', but deepspeed.offload_param is true"),
    # null would replace our section in the merge: offload silently off
    ({"zero_stage": 2, "offload_optimizer": True}, {"zero_optimization": {"offload_optimizer": None}},
     "offload_optimizer.device='none', but deepspeed.offload_optimizer is true"),
    ({"zero_stage": 2}, {"zero_optimization": {"cpu_offload": True}}, "cpu_offload, DeepSpeed's old spelling"),
    ({"zero_stage": 2, "offload_optimizer": True}, {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     "'nvme', which DeepSpeed supports with zero_stage 3 only (it is 2)"),
    ({}, {"data_types": {"grad_accum_dtype": "fp32"}}, "grad_accum_dtype='fp32', which DeepSpeed supports"),
    ({"zero_stage": 1}, {"data_types": {"grad_accum_dtype": "FP32"}}, "grad_accum_dtype='FP32'; DeepSpeed knows"),
    # the optimizer settings the resolved config prints (a raw lr would silently train at another rate)
    ({}, {"optimizer": {"params": {"lr": 1e-3}}}, "optimizer.params.lr=0.001, but the YAML's learning rate "
                                                 "(train.lr; PPO: train.policy_lr and train.critic_lr, one per engine, "
                                                 "so a raw lr cannot fit both) gives 1e-05"),
    ({}, {"optimizer": {"params": {"betas": [0.9, 0.999]}}}, "optimizer.params.betas=[0.9, 0.999], but train.adam_betas"),
    ({}, {"gradient_clipping": 5.0}, "gradient_clipping=5.0, but train.gradient_clipping (PPO: ppo.grad_clip) gives "
                                     "0.0"),
    ({}, {"scheduler": {"type": "WarmupLR"}}, "sets scheduler; it is set by the YAML's train.lr_scheduler"),
    ({}, {"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb'; rlhf trains with AdamW"),
    # the merged ZeRO section against DeepSpeed's own schema: a misspelt key, a value of the wrong type
    ({"zero_stage": 2}, {"zero_optimization": {"overlap_comn": True}},
     "zero_optimization.overlap_comn: Extra inputs are not permitted (got True"),
    ({"zero_stage": 2}, {"zero_optimization": {"reduce_bucket_size": "5e8x"}},
     "zero_optimization.reduce_bucket_size: Input should be a valid integer"),
])
def test_raw_deepspeed_json_may_not_change_stage_precision_or_offload(yaml_ds, raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_deepspeed_config(TrainConfig(lr=1e-5, gradient_clipping=0), DeepSpeedConfig(**yaml_ds, config=raw), 1,
                               False)


def test_raw_deepspeed_json_may_tune_what_the_yaml_chose():
    """The same values again (also as DeepSpeed reads strings), the offload device (NVMe) and its settings,
    float32 accumulation from ZeRO-1, "auto" meaning the YAML's value."""
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, precision="bf16", config={
        "zero_optimization": {"stage": "3", "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
                              "reduce_bucket_size": "auto"},
        "bf16": {"enabled": "true"}, "fp16": {"enabled": "auto"}, "data_types": {"grad_accum_dtype": "fp32"},
        "train_micro_batch_size_per_gpu": "auto"})
    cfg = build_deepspeed_config(TrainConfig(micro_batch_size=4), ds, 1, True)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": True}
    assert "reduce_bucket_size" not in cfg["zero_optimization"] and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] == "true"
    half = DeepSpeedConfig(precision="fp16", config={"data_types": {"grad_accum_dtype": "half"}})
    assert build_deepspeed_config(TrainConfig(), half, 1, False)["data_types"] == {"grad_accum_dtype": "half"}


def test_init_process_group_drops_only_deepspeeds_built_successfully_line(monkeypatch, capsys):
    """DeepSpeed prints "... built successfully" on every rank of every CPU run; other output passes, also when
    init_distributed raises."""
    import deepspeed

    from stages.distributed import init_process_group

    def fake_init(verbose: bool) -> None:
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a warning worth reading")
        if fail:
            raise RuntimeError("rendezvous failed")

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    fail = False
    init_process_group()
    assert capsys.readouterr().out == "a warning worth reading\n"
    fail = True
    with pytest.raises(RuntimeError, match="rendezvous failed"):
        init_process_group()
    assert capsys.readouterr().out == "a warning worth reading\n"


def test_a_training_engine_trains_a_pretrained_model_in_training_mode(process_group, tmp_path):
    """transformers' from_pretrained returns a model in eval mode, where it applies no dropout and checkpoints no
    activations (its layers ask `self.training`): the engine starts in training mode, so with gradient
    checkpointing a layer's forward runs twice in a forward and backward pass (the second: its recomputation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.engine import initialize_engine
    from stages.models import enable_activation_checkpointing

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not model.training  # what the engine is handed
    enable_activation_checkpointing(model)  # (what the stages call: either transformers spelling)
    calls: list[int] = []
    mlp = model.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):  # (a forward hook would not see the recomputation)
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    train = TrainConfig(micro_batch_size=1)
    engine = initialize_engine(model, build_deepspeed_config(train, DeepSpeedConfig(precision="fp32"), 1, False),
                               train, 10)
    assert all(m.training for m in engine.module.modules())
    ids = torch.randint(0, 64, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    assert len(calls) == 2


def test_gradient_clipping_acts_in_the_engine_step(process_group):
    """train.gradient_clipping (and PPO's grad_clip, the same engine setting) scales the gradients before AdamW:
    clipped to a global norm of 1e-12, far below adam_eps (1e-8), the first step moves each weight by about
    lr * g / eps, at most ~1e-4 * lr; unclipped, AdamW's first step moves every weight with a gradient by about
    lr (|g| >> eps). Without clipping reaching DeepSpeed both would move by ~lr. 0 is off in DeepSpeed too (a
    config without the key clips at DeepSpeed's default, 1.0, which Adam's first step cannot tell apart)."""
    import torch

    from conftest import tiny_engine

    moved = {}
    for clip in (0.0, 1e-12):
        engine, _ = tiny_engine(1, lr=1e-3, gradient_clipping=clip, weight_decay=0.0, warmup_steps=0)
        assert engine.gradient_clipping() == clip
        before = [p.detach().clone() for p in engine.module.parameters()]
        ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        moved[clip] = max(float((p.detach() - b).abs().max()) for p, b in zip(engine.module.parameters(), before))
    assert moved[0.0] == pytest.approx(1e-3, rel=0.05)
    assert moved[1e-12] < 1e-3 * 1e-3


@pytest.mark.parametrize("stage", [0, 2])
def test_the_engine_steps_the_schedule_once_per_optimizer_step_with_accumulation(process_group, stage):
    """A real DeepSpeed engine with gradient_accumulation_steps 3: the learning rate of each optimizer step is
    lr_factor of that step (warm-up from the first, not 0), the schedule moving at the accumulation boundary only,
    not at every micro-batch (a peer bug: warm-up off by one, or stepped per micro-batch)."""
    import torch

    from conftest import tiny_engine

    ds = DeepSpeedConfig(zero_stage=stage, precision="fp32")
    engine, _ = tiny_engine(4, ds, lr=1.0, gradient_accumulation_steps=3, warmup_steps=2, lr_scheduler="linear",
                            min_lr_ratio=0.1)
    ids = torch.tensor([[1, 5, 9, 3]])
    seen = []
    for micro in range(12):
        seen.append(engine.get_lr()[0])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    per_step = [lr_factor(s, 4, 2, "linear", 0.1) for s in range(4)]
    assert per_step == pytest.approx([0.5, 1.0, 1.0, 0.55])
    assert seen == pytest.approx([f for f in per_step for _ in range(3)])  # (one value through each step's 3)
    assert engine.global_steps == 4


def test_a_reloaded_offload_optimizer_takes_its_next_step_as_the_uninterrupted_one(process_group, tmp_path,
                                                                                    monkeypatch):
    """ZeRO-2 with offload_optimizer steps DeepSpeedCPUAdam, whose C++ beta^t (a product of betas, one factor per
    step) is in no state dict: reloaded after step 5, its step 6 took pow(beta2, 6), an ulp off the product in
    float32 (so at some steps, not all), and a resumed run's weights drifted from the uninterrupted run's (an SFT
    run: ~1e-7 after a few steps). _load_engine now replays its step calls: the same probe update at step 6
    gives the uninterrupted optimizer's result bit for bit, and without the replay it does not (the test can
    fail)."""
    import torch

    import stages.engine
    from conftest import tiny_engine
    from stages.checkpoint import _load_engine
    from stages.config import DeepSpeedConfig

    offload = DeepSpeedConfig(zero_stage=2, offload_optimizer=True)

    def trained(steps: int):
        engine, _ = tiny_engine(20, offload, lr=1e-2, warmup_steps=0)
        for k in range(steps):
            torch.manual_seed(k)  # GPT-2's dropout, and the batch
            ids = torch.randint(0, 64, (1, 8))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        return engine

    def probe(engine) -> torch.Tensor:
        """One C++ Adam update at step 6 of probe tensors (weights, gradients, moments: the same each time); its
        result depends on both betas^t."""
        opt = stages.engine.cpu_adam_of(engine)
        group = opt.param_groups[0]
        rng = torch.Generator().manual_seed(0)
        weights, grads, exp_avg = (torch.randn(4096, generator=rng) for _ in range(3))
        exp_avg_sq = torch.rand(4096, generator=rng)
        opt.ds_opt_adam.adam_update(opt.opt_id, 6, 1.0, *group["betas"], group["eps"], 0.0, True, weights, grads,
                                    exp_avg, exp_avg_sq)
        return weights

    first = trained(5)
    assert type(stages.engine.cpu_adam_of(first)).__name__ == "DeepSpeedCPUAdam"
    first.save_checkpoint(str(tmp_path / "ds"), tag="state", client_state={"trainer": {}})
    uninterrupted = probe(first)
    resumed = {}
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(stages.engine, "replay_cpu_adam_steps", lambda engine: None)
        engine = trained(0)
        _load_engine(engine, tmp_path / "ds", tmp_path)
        resumed[replay] = probe(engine)
    assert torch.equal(resumed[True], uninterrupted)
    assert not torch.equal(resumed[False], uninterrupted)


def test_an_fp16_overflow_step_has_no_gradient_norm_and_is_counted(process_group):
    """fp16: DeepSpeed's loss scaler skips a step whose gradients overflow and reports its norm as inf; that step
    logs no norm (an inf would also turn PPO's mean over the iteration's steps into inf) and is counted
    (train/fp16_skipped_steps), while a non-finite norm without fp16 still stops the run."""
    import torch

    from stages.errors import NonFinite
    from stages.trainer import LossGuard, fp16_skipped_steps, optimizer_step

    class Engine:
        def __init__(self, fp16: bool, applied: bool) -> None:
            self.fp16, self.applied, self.skipped_steps = fp16, applied, 0 if applied else 1
            self.module = torch.nn.Linear(2, 1)

        def backward(self, loss):
            pass

        def step(self):
            pass

        def zero_optimization_stage(self):
            return 2

        def get_global_grad_norm(self):
            return float("inf") if not self.applied else 0.5

        def fp16_enabled(self):
            return self.fp16

        def was_step_applied(self):
            return self.applied

    def loss(batch):
        return torch.tensor(1.0)

    assert optimizer_step(Engine(True, False), [0], loss, LossGuard("loss", 1)) is None
    assert optimizer_step(Engine(True, True), [0], loss, LossGuard("loss", 1)) == 0.5
    assert fp16_skipped_steps(Engine(True, False)) == 1.0 and fp16_skipped_steps(Engine(False, True)) is None
    with pytest.raises(NonFinite, match="non-finite gradient norm"):
        optimizer_step(Engine(False, False), [0], loss, LossGuard("loss", 1))


def test_each_worker_picks_its_gpu_from_local_rank_or_its_only_visible_one(monkeypatch):
    from stages.distributed import device_index
    from stages.errors import RlhfError

    assert [device_index(rank, 8) for rank in range(8)] == list(range(8))  # deepspeed / torchrun on one node
    assert device_index(3, 1) == 0  # srun --gpus-per-task=1: the node's fourth task sees its one GPU as 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RlhfError, match=r"LOCAL_RANK=2 but sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1\)"):
        device_index(2, 2)
