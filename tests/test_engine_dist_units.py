"""Unit pins for stages/engine.py (the DeepSpeed JSON, raw-JSON checks, LR schedule, parameter groups, dtypes)
and stages/distributed.py (set-up on a faked accelerator, small collectives over a faked torch.distributed,
run_on_main, seeding, RNG state restore): pure functions and monkeypatched fakes, no process group, no GPU."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stages import distributed
from stages.config import DeepSpeedConfig, TrainConfig, as_bool
from stages.distributed import DistInfo
from stages.engine import (build_deepspeed_config, compute_dtype, deep_merge, load_raw_deepspeed, lr_factor,
                           model_dtype, param_groups)
from stages.errors import ConfigError, RlhfError


# --------------------------------------------------------------------------------------------------- engine.py


def test_as_bool_reads_every_spelling_deepspeed_accepts() -> None:
    """as_bool: the one-letter and padded/upper-case spellings, plain values, and a refusal for anything else."""
    assert [as_bool(v) for v in ("t", "T", " y ", "On", "1", "true")] == [True] * 6
    assert [as_bool(v) for v in ("f", "N", " off", "0", "False", "no")] == [False] * 6
    assert (as_bool(1), as_bool(0), as_bool(True), as_bool(None)) == (True, False, True, False)
    with pytest.raises(ValueError, match="not a boolean: 'maybe'"):
        as_bool("maybe")


def test_deep_merge_merges_nested_mappings_and_leaves_its_inputs_untouched() -> None:
    """deep_merge: nested keys merge, a non-mapping replaces a mapping, and neither input is changed or aliased."""
    base: dict[str, Any] = {"a": {"x": 1, "y": [1]}, "b": {"k": 1}, "c": 3}
    extra: dict[str, Any] = {"a": {"y": [2], "z": 3}, "b": 5, "d": {"n": [4]}}
    out = deep_merge(base, extra)
    assert out == {"a": {"x": 1, "y": [2], "z": 3}, "b": 5, "c": 3, "d": {"n": [4]}}
    assert base == {"a": {"x": 1, "y": [1]}, "b": {"k": 1}, "c": 3}
    out["d"]["n"].append(5)
    out["a"]["y"].append(6)
    assert extra == {"a": {"y": [2], "z": 3}, "b": 5, "d": {"n": [4]}}


def test_load_raw_deepspeed_refuses_malformed_or_non_object_json(tmp_path: Path) -> None:
    """load_raw_deepspeed: invalid JSON and a JSON list are ConfigErrors naming the file; nested "auto" is dropped."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read DeepSpeed JSON .*bad.json"):
        load_raw_deepspeed(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json must hold a JSON object"):
        load_raw_deepspeed(str(listed))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": "auto", "b": {"c": "auto", "d": 1}}))
    assert load_raw_deepspeed(str(good)) == {"b": {"d": 1}} and load_raw_deepspeed(None) == {}


def test_the_whole_deepspeed_json_of_a_cpu_zero3_offload_fp16_config() -> None:
    """build_deepspeed_config: every key of the JSON for ZeRO-3 + both offloads, fp16, 2 ranks, no GPU."""
    train = TrainConfig(micro_batch_size=3, gradient_accumulation_steps=2, lr=2e-4, weight_decay=0.01,
                        adam_betas=(0.8, 0.9), adam_eps=1e-6, gradient_clipping=0.5)
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_param=True, precision="fp16")
    assert build_deepspeed_config(train, ds, world_size=2, on_gpu=False) == {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 12,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "offload_param": {"device": "cpu", "pin_memory": False},
                              "stage3_gather_16bit_weights_on_model_save": False},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.01}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
        "gradient_clipping": 0.5,
    }


def test_only_a_cpu_run_without_optimizer_offload_uses_torch_adamw() -> None:
    """torch_adam is set without a GPU and without offload only: a GPU run keeps DeepSpeed's fused AdamW."""
    def torch_adam(on_gpu: bool, **ds: Any) -> bool:
        cfg = build_deepspeed_config(TrainConfig(), DeepSpeedConfig(**ds), 1, on_gpu)
        return cfg["optimizer"]["params"].get("torch_adam", False)

    assert torch_adam(False) is True
    assert torch_adam(True) is False
    assert torch_adam(True, zero_stage=2, offload_optimizer=True) is False
    assert torch_adam(False, zero_stage=2, offload_optimizer=True) is False


def test_raw_json_may_repeat_what_the_yaml_says_in_deepspeeds_spellings() -> None:
    """A raw "AdamW" in any case, gradient_clipping 0 when the YAML's is off, a different grad_accum_dtype from
    ZeRO-1 and NVMe offload under ZeRO-3 are accepted; NVMe under ZeRO-2 is refused."""
    raw = {"optimizer": {"type": "AdamW"}, "gradient_clipping": 0, "data_types": {"grad_accum_dtype": "fp32"}}
    cfg = build_deepspeed_config(TrainConfig(gradient_clipping=0), DeepSpeedConfig(zero_stage=1, config=raw), 1, False)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["gradient_clipping"] == 0
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    for stage, ok in ((3, True), (2, False)):
        ds = DeepSpeedConfig(zero_stage=stage, offload_optimizer=True,
                             config={"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/n"}}})
        if ok:
            build_deepspeed_config(TrainConfig(), ds, 1, False)
        else:
            with pytest.raises(ConfigError, match="zero_stage 3 only"):
                build_deepspeed_config(TrainConfig(), ds, 1, False)


def test_lr_factor_past_the_last_step_and_with_warmup_filling_the_run() -> None:
    """lr_factor: p is clamped at 1 past total_steps (cosine and linear stay at m) and T == W divides by 1."""
    assert lr_factor(12, 10, 2, "cosine", 0.1) == pytest.approx(0.1)  # p = min(1, 10/8)
    assert lr_factor(14, 10, 2, "linear", 0.2) == pytest.approx(0.2)
    assert lr_factor(5, 5, 5, "cosine", 0.1) == 1.0  # step T after a run that was all warm-up: p = 0 / max(1, 0)
    assert lr_factor(6, 5, 5, "linear", 0.0) == pytest.approx(0.0)  # p = min(1, 1/1)
    assert lr_factor(4, 10, 4, "cosine", 0.0) == 1.0 and lr_factor(3, 10, 4, "cosine", 0.0) == 1.0  # (3+1)/4
    with pytest.raises(ValueError, match="unknown lr_scheduler 'step'"):
        lr_factor(5, 10, 2, "step", 0.0)


def test_param_groups_use_zero3_full_shapes_skip_frozen_and_add_no_empty_group() -> None:
    """param_groups: a ZeRO-3 partitioned matrix (empty data, ds_shape 2-D) is decayed, frozen weights are left
    out, and a model without vectors has one group."""
    lin = torch.nn.Linear(4, 4)
    lin.weight.ds_shape = torch.Size([4, 4])  # what zero.Init leaves: the data is a 1-D shard
    lin.weight.data = torch.empty(0)
    groups = param_groups(lin, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["params"][0] is lin.weight and groups[1]["params"][0] is lin.bias
    frozen = torch.nn.Linear(4, 4)
    frozen.bias.requires_grad_(False)
    only = param_groups(frozen, 0.1)
    assert len(only) == 1 and only[0]["params"] == [frozen.weight]


def test_compute_dtype_is_the_precision_unless_fp32_keeps_the_loaded_dtype() -> None:
    """compute_dtype / model_dtype: bf16/fp16 engines compute in that dtype whatever was loaded; fp32 as loaded."""
    assert compute_dtype("float32", "bf16") == torch.bfloat16
    assert compute_dtype("float32", "fp16") == torch.float16
    assert compute_dtype("bfloat16", "fp32") == torch.bfloat16
    assert compute_dtype("auto", "fp32") == torch.float32
    assert model_dtype("auto", "fp16") == torch.float16 and model_dtype("float32", "bf16") == torch.float32


# ---------------------------------------------------------------------------------------------- distributed.py


def test_is_main_is_global_rank_zero_not_local_rank_zero() -> None:
    """DistInfo.is_main: rank 0 of the run; a second node's local rank 0 is not main."""
    cpu = torch.device("cpu")
    assert DistInfo(0, 0, 2, cpu).is_main and not DistInfo(1, 0, 2, cpu).is_main


class FakeAccelerator:
    """A one-GPU CUDA accelerator as DeepSpeed's get_accelerator() shows it, recording set_device."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.set: list[int] = []

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.set.append(index)


def fake_setup(monkeypatch: pytest.MonkeyPatch, accel: FakeAccelerator, rank: int, world: int) -> list[Any]:
    """setup_distributed's collaborators faked (no process group is made, no peer watcher started: no store to
    ask); returns the init calls, then the (rank, world size) of each watch started."""
    import deepspeed.accelerator
    import deepspeed.comm

    inits: list[Any] = []
    monkeypatch.setattr(distributed, "_INFO", None)
    monkeypatch.setattr(distributed, "start_watch", lambda rank, world: inits.append((rank, world)))
    monkeypatch.setattr(distributed, "select_accelerator_env", lambda: None)
    monkeypatch.setattr(distributed, "quiet_libraries", lambda: None)
    monkeypatch.setattr(distributed, "init_process_group", lambda: inits.append(1))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda: rank)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda: world)
    return inits


def test_setup_distributed_gives_a_one_gpu_worker_index_0_and_keeps_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launched worker (LOCAL_RANK 3) seeing one GPU: DeepSpeed's LOCAL_RANK becomes 0, set_device(0),
    DistInfo keeps local_rank 3 on cuda:0; a second call returns the same object without re-initialising."""
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    accel = FakeAccelerator(1)
    inits = fake_setup(monkeypatch, accel, 3, 4)
    info = distributed.setup_distributed()
    assert info == DistInfo(rank=3, local_rank=3, world_size=4, device=torch.device("cuda", 0))
    assert accel.set == [0] and distributed.os.environ["LOCAL_RANK"] == "0"
    assert distributed.os.environ["MASTER_PORT"] == "29500"
    assert distributed.setup_distributed() is info and inits == [1, (3, 4)]


def test_setup_distributed_refuses_a_world_size_without_the_other_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlhf bench ppo` and other callers that do not pass the CLI's stage check: a stray WORLD_SIZE is a
    ConfigError naming what is missing, before any process group (DeepSpeed would look for MPI)."""
    from stages.errors import ConfigError

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    inits = fake_setup(monkeypatch, FakeAccelerator(0), 0, 1)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 is set, as in a worker of a launcher, but RANK, LOCAL_RANK"):
        distributed.setup_distributed()
    assert inits == []


def test_setup_distributed_alone_takes_a_fresh_port_whenever_world_size_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WORLD_SIZE (not a launched worker, even with a stray RANK): rank 0 of 1 on a port free here, not an
    inherited MASTER_PORT."""
    monkeypatch.setenv("WORLD_SIZE", "1")  # (so that the WORLD_SIZE setup_distributed sets is removed afterwards:
    monkeypatch.delenv("WORLD_SIZE")  #     left alone, a later CLI test took itself for a launcher's worker)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_PORT", "1"), ("MASTER_ADDR", "10.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "free_port", lambda: 45678)
    fake_setup(monkeypatch, FakeAccelerator(2), 0, 1)
    info = distributed.setup_distributed()
    env = distributed.os.environ
    assert (env["WORLD_SIZE"], env["MASTER_PORT"], env["MASTER_ADDR"]) == ("1", "45678", "127.0.0.1")
    assert info.device == torch.device("cuda", 0) and info.world_size == 1


def test_peer_lost_needs_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """peer_lost: a "Connection reset by peer" RuntimeError is a lost peer with WORLD_SIZE 2, not in one process."""
    lost = RuntimeError("gloo: Connection reset by peer")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.peer_lost(lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.peer_lost(lost) and not distributed.peer_lost(OSError("Broken pipe"))


class FakeTorchDist:
    """torch.distributed with `world` ranks, whose other ranks hold `others` (values, objects)."""

    def __init__(self, world: int, others: list[Any]) -> None:
        self.world, self.others, self.calls = world, others, []

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.world

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> None:
        self.calls.append(("all_reduce", op))
        values = [t.clone()] + [torch.full_like(t, v) for v in self.others]
        out = torch.stack(values).amax(0) if op == torch.distributed.ReduceOp.MAX else torch.stack(values).sum(0)
        t.copy_(out)

    def broadcast_object_list(self, box: list[Any], src: int = 0) -> None:
        self.calls.append(("broadcast", src))
        box[0] = self.others[src]

    def all_gather_object(self, boxes: list[Any], obj: Any) -> None:
        self.calls.append(("gather", len(boxes)))
        assert len(boxes) == self.world
        boxes[:] = [obj] + self.others


def test_small_collectives_over_a_faked_two_rank_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """all_reduce_max takes the max (not the sum); broadcast_object uses src; gather_objects/gather_floats keep
    rank order; all_reduce_sum returns a new tensor, leaving the caller's untouched."""
    import deepspeed.comm

    fake = FakeTorchDist(2, [5])
    monkeypatch.setattr(torch.distributed, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(torch.distributed, "get_world_size", fake.get_world_size)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", fake.broadcast_object_list)
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake.all_gather_object)
    cpu = torch.device("cpu")
    assert distributed.all_reduce_max(3, cpu) == 5 and distributed.all_reduce_max(7, cpu) == 7
    fake.others = ["from 0", "from 1"]
    assert distributed.broadcast_object("mine", src=1) == "from 1"
    fake.others = [[3.0, 4.0]]
    assert distributed.gather_floats([1.0, 2.0]) == [1.0, 2.0, 3.0, 4.0]
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(deepspeed.comm, "all_reduce", lambda t: t.mul_(2))
    mine = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert distributed.all_reduce_sum(mine, cpu).tolist() == [2.0, 4.0] and mine.tolist() == [1.0, 2.0]


def test_run_on_main_runs_on_rank_0_only_and_every_rank_raises_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_on_main: rank 1 does not run fn but raises the RlhfError rank 0 broadcast; rank 0 raises its own. Both
    are marked `every_rank`: printed once, and no rank's own failure for the others to be told of."""
    cpu = torch.device("cpu")
    ran: list[int] = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: RlhfError("rank 0 failed"))
    with pytest.raises(RlhfError, match="rank 0 failed") as raised:
        distributed.run_on_main(lambda: ran.append(1), DistInfo(1, 1, 2, cpu))
    assert ran == [] and raised.value.every_rank
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    distributed.run_on_main(lambda: ran.append(0), DistInfo(0, 0, 1, cpu))
    assert ran == [0]

    def fail() -> None:
        raise RlhfError("bad data")

    with pytest.raises(RlhfError, match="bad data") as raised:
        distributed.run_on_main(fail, DistInfo(0, 0, 1, cpu))
    assert raised.value.every_rank


def test_seed_everything_takes_seeds_past_numpys_32_bits() -> None:
    """seed_everything: numpy gets seed mod 2**32 (np.random.seed refuses 2**32 and more); python and torch the seed."""
    saved = distributed.rng_state(torch.device("cpu"))
    try:
        distributed.seed_everything(2**32 + 5)
        got = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        random.seed(2**32 + 5)
        np.random.seed(5)
        torch.manual_seed(2**32 + 5)
        assert got == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    finally:
        distributed.set_rng_state(saved, torch.device("cpu"))


def test_set_rng_state_restores_no_gpu_generator_it_has_no_entry_for_or_on_a_cpu_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """set_rng_state: an old "cuda" list of 3 has no entry for cuda:3 (no call, no IndexError); a CPU rank
    restores no GPU generator even from a GPU checkpoint."""
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device: calls.append((st, device)))
    state = distributed.rng_state(torch.device("cpu"))
    distributed.set_rng_state({**state, "cuda": ["s0", "s1", "s2"]}, torch.device("cuda", 3))
    distributed.set_rng_state({**state, "cuda_device": "g", "cuda": ["s0"]}, torch.device("cpu"))
    assert calls == []
    distributed.set_rng_state({**state, "cuda": ["s0", "s1", "s2"]}, torch.device("cuda", 2))
    assert calls == [("s2", torch.device("cuda", 2))]
