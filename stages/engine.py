"""DeepSpeed engine set-up: the DeepSpeed JSON built from the YAML sections, parameter groups and the LR schedule."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from stages.config import PRECISION_DTYPES, DeepSpeedConfig, TrainConfig, as_bool
from stages.errors import ConfigError

#: DeepSpeed keys (dotted paths) that the YAML owns, with the YAML key and how DeepSpeed reads the value; a raw
#: DeepSpeed JSON may repeat them only with the same value. The rest of the code acts on the YAML's values
#: (ZeRO-3's sampling copy and weight gathering, the dtypes, the memory estimate), so a raw JSON that changed
#: them behind its back would break it.
OWNED_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps (PPO: train.mini_batch_size / "
                                    "train.micro_batch_size)", int),
    "train_batch_size": ("train.micro_batch_size x train.gradient_accumulation_steps x ranks (PPO: "
                         "train.mini_batch_size x ranks)", int),
    "zero_optimization.stage": ("deepspeed.zero_stage", int),
    "bf16.enabled": ("deepspeed.precision", as_bool),
    "fp16.enabled": ("deepspeed.precision", as_bool),
    # the optimizer settings the printed resolved config states (and resume compares)
    "optimizer.params.lr": ("the YAML's learning rate (train.lr; PPO: train.policy_lr and train.critic_lr, one per "
                            "engine, so a raw lr cannot fit both)", float),
    "optimizer.params.eps": ("train.adam_eps", float),
    "optimizer.params.weight_decay": ("train.weight_decay", float),
    "optimizer.params.betas": ("train.adam_betas", lambda v: [float(x) for x in v]),
    "gradient_clipping": ("train.gradient_clipping (PPO: ppo.grad_clip)", float),
}
#: raw DeepSpeed sections our code replaces or decides: refused rather than silently ignored or half applied
REFUSED_SECTIONS = {"scheduler": "the YAML's train.lr_scheduler, warm-up and min_lr_ratio (DeepSpeed would "
                                 "ignore this one: the engine is given our schedule)"}
#: offload sections: the raw JSON may pick the device and its settings, not whether there is one
OFFLOAD_KEYS = {"offload_optimizer": "deepspeed.offload_optimizer", "offload_param": "deepspeed.offload_param"}
#: DeepSpeed's old spellings of offload, which would switch it behind the YAML's back
OFFLOAD_ALIASES = {"cpu_offload": "deepspeed.offload_optimizer", "cpu_offload_param": "deepspeed.offload_param",
                   "cpu_offload_use_pin_memory": "deepspeed.offload_optimizer"}
#: DeepSpeed's spellings of a dtype (case-sensitive, as its DtypeEnum) -> our precision name
ACCUM_DTYPES = {"torch.float32": "fp32", "fp32": "fp32", "float32": "fp32", "float": "fp32",
                "torch.float16": "fp16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "torch.bfloat16": "bf16", "bf16": "bf16", "bfloat16": "bf16"}

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`; nested mappings merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw_deepspeed(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """The raw DeepSpeed JSON (a file or a mapping) without its "auto" values: as with HF's Trainer, "auto"
    means "what the YAML gives" (DeepSpeed itself would drop the key and fall back to its own default)."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return _without_auto(raw)
    try:
        data = json.loads(Path(raw).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed.config: cannot read DeepSpeed JSON {raw}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: {raw} must hold a JSON object")
    return _without_auto(data)


def _without_auto(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in data.items() if v != "auto"}


def build_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for one trained model.

    train_batch_size = micro_batch_size x gradient_accumulation_steps x world_size. The optimizer is AdamW
    (DeepSpeed picks its fused / CPU-offload implementation); the LR schedule is ours (see `lr_factor`).
    Without a GPU (and without optimizer offload) it is torch's AdamW: DeepSpeed's CPU build of FusedAdam
    multiplies beta^t up step by step but recomputes it with pow() after a checkpoint reload, so a resumed run
    drifted from an uninterrupted one by an ulp at some steps; torch's AdamW takes pow() every step, so resume
    on the CPU is bit-exact.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves for the HF save
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.adam_betas),
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device before every forward and after every step, and
        # its step counter, read in the engine's forward hook, made a compiled decoding step recompile at every
        # PPO iteration; we time phases ourselves (stages/perf.py)
        "timers": {"throughput": {"enabled": False}},
    }
    if not on_gpu and not ds.offload_optimizer:
        config["optimizer"]["params"]["torch_adam"] = True
    config["gradient_clipping"] = train.gradient_clipping  # 0: off (left out, DeepSpeed would clip at 1.0)
    raw = load_raw_deepspeed(ds.config)
    check_owned_keys(raw, config)
    check_accumulation_dtype(raw, ds)
    merged = deep_merge(config, raw)
    check_zero_section(merged["zero_optimization"])
    return merged


def check_zero_section(zero: dict[str, Any]) -> None:
    """The merged zero_optimization section against DeepSpeed's own schema (a misspelt key such as
    overlap_comn, a value of the wrong type), now rather than in every worker after the models load."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"deepspeed.config: zero_optimization.{where}: {first['msg']} "
                          f"(got {first.get('input')!r}; DeepSpeed's ZeRO settings)") from None


def check_owned_keys(raw: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a raw DeepSpeed JSON that contradicts what the YAML set (`OWNED_KEYS`, `OFFLOAD_KEYS`,
    `OFFLOAD_ALIASES`), comparing values as DeepSpeed reads them ("2" is 2, "true" is true)."""
    zero_raw = raw.get("zero_optimization", {})
    if not isinstance(zero_raw, dict):
        raise ConfigError(f"deepspeed.config sets zero_optimization={zero_raw!r}: give a mapping (DeepSpeed's old "
                          "true/false form is not supported); set deepspeed.zero_stage in the YAML")
    for key, owner in REFUSED_SECTIONS.items():
        if key in raw:
            raise ConfigError(f"deepspeed.config sets {key}; it is set by {owner}")
    kind = json_section(raw, ["optimizer"]).get("type")
    if kind is not None and str(kind).lower() != "adamw":
        raise ConfigError(f"deepspeed.config sets optimizer.type={kind!r}; rlhf trains with AdamW (its settings are "
                          "train.lr, adam_betas, adam_eps and weight_decay in the YAML)")
    for path, (owner, read) in OWNED_KEYS.items():
        *parents, leaf = path.split(".")
        raw_at, ours = json_section(raw, parents), json_section(config, parents)
        if leaf not in raw_at:
            continue
        try:
            same = read(raw_at[leaf]) == ours.get(leaf)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"deepspeed.config sets {path}={raw_at[leaf]!r}: {exc}") from None
        if not same:
            given = repr(ours.get(leaf))
            if owner == "deepspeed.precision":
                given = next((name for name in ("bf16", "fp16") if config[name]["enabled"]), "fp32")
            raise ConfigError(f"deepspeed.config sets {path}={raw_at[leaf]!r}, but {owner} gives "
                              f"{given}; set it in the YAML instead")
    for key, owner in OFFLOAD_ALIASES.items():
        if key in zero_raw:
            raise ConfigError(f"deepspeed.config sets zero_optimization.{key}, DeepSpeed's old spelling of offload; "
                              f"set {owner} in the YAML instead")
    for key, owner in OFFLOAD_KEYS.items():
        if key not in zero_raw:
            continue
        section = zero_raw[key]
        device = "none" if section is None else section.get("device") if isinstance(section, dict) else section
        ours = key in config["zero_optimization"]
        if device is not None and (str(device) != "none") != ours:
            raise ConfigError(f"deepspeed.config sets zero_optimization.{key}.device={device!r}, but {owner} is "
                              f"{str(ours).lower()}; set {owner} in the YAML instead (the raw JSON may choose "
                              "the device and its settings)")
        if device == "nvme" and config["zero_optimization"]["stage"] != 3:
            raise ConfigError(f"deepspeed.config sets zero_optimization.{key}.device='nvme', which DeepSpeed "
                              "supports with zero_stage 3 only (it is "
                              f"{config['zero_optimization']['stage']})")


def json_section(tree: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The mapping at `keys` inside `tree`; {} where a key is missing or holds no mapping."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree.get(key), dict) else {}
    return tree


def accumulation_dtype(raw: dict[str, Any]) -> Any:
    """A raw DeepSpeed JSON's data_types.grad_accum_dtype as written (None when unset)."""
    return json_section(raw, ["data_types"]).get("grad_accum_dtype")


def check_accumulation_dtype(raw: dict[str, Any], ds: DeepSpeedConfig) -> None:
    """data_types.grad_accum_dtype must be one of DeepSpeed's spellings, and other than the training precision
    only from ZeRO-1 on (DeepSpeed raises at engine start otherwise)."""
    accum = accumulation_dtype(raw)
    if accum is None:
        return
    if accum not in ACCUM_DTYPES:
        raise ConfigError(f"deepspeed.config sets data_types.grad_accum_dtype={accum!r}; DeepSpeed knows "
                          f"{', '.join(ACCUM_DTYPES)}")
    if ds.zero_stage == 0 and ACCUM_DTYPES[accum] != ds.precision:
        raise ConfigError(f"deepspeed.config sets data_types.grad_accum_dtype={accum!r}, which DeepSpeed supports "
                          f"with deepspeed.precision {ds.precision} only from zero_stage 1 on (it is 0)")


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    warm-up (step < W):      (step + 1) / W
    after, p = (step - W) / max(1, T - W):
      cosine:   m + (1 - m) * 0.5 * (1 + cos(pi * p))
      linear:   m + (1 - m) * (1 - p)
      constant: 1
    with T = total_steps, W = warmup_steps, m = min_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def warmup_steps_for(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total_steps)
    return int(round(train.warmup_ratio * total_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights (ndim < 2) get none."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitioned parameters keep their full shape in ds_shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_scheduler_factory(train: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    warmup = warmup_steps_for(train, total_steps)

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, train.lr_scheduler, train.min_lr_ratio)
        )

    return factory


def initialize_engine(
    model: torch.nn.Module, ds_config: dict[str, Any], train: TrainConfig, total_steps: int
) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and our LR schedule (stepped by engine.step()), in
    training mode: transformers' `from_pretrained` returns a model in eval mode, where it applies no dropout and
    checkpoints no activations (its layers checkpoint only when `self.training`), and DeepSpeed leaves the mode
    as it finds it. (Evaluation switches to eval mode and back; PPO's models have their dropout set to 0.)"""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, train.weight_decay),
        config=ds_config,
        lr_scheduler=make_scheduler_factory(train, total_steps),
    )
    engine.train()
    return engine


def cpu_adam_of(engine: Any) -> Any:
    """The DeepSpeedCPUAdam inside an engine's optimizer wrappers (optimizer offload), None without one."""
    opt = getattr(engine, "optimizer", None)
    for _ in range(4):  # engine.optimizer: a ZeRO wrapper (or the optimizer); its .optimizer: the one it steps
        if opt is None or type(opt).__name__ == "DeepSpeedCPUAdam":
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def replay_cpu_adam_steps(engine: Any) -> None:
    """Put a reloaded CPU Adam (optimizer offload) where an uninterrupted run's is, so that resume is bit-exact.

    DeepSpeedCPUAdam's C++ optimizer keeps beta^t beside the last step it saw, outside the state dict: the first
    call for the next step multiplies beta^t by beta (later calls for the same step leave it), a call for any
    other step recomputes it as pow(beta, step). An uninterrupted run reaches step S+1 holding the product of S
    betas; a reloaded one would take pow(beta, S+1), which differs from it in float32 at some steps, and the
    weights drift. So one call per step 1..S is made again, on empty tensors (no weight is touched)."""
    opt = cpu_adam_of(engine)
    if opt is None:
        return
    last = max((int(state["step"]) for state in opt.state.values() if "step" in state), default=0)
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0)
    for step in range(1, last + 1):
        opt.ds_opt_adam.adam_update(opt.opt_id, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                                    group["bias_correction"], empty, empty, empty, empty)


def model_dtype(model_dtype_name: str, precision: str) -> torch.dtype:
    """The dtype to load weights in: explicit, or (auto) the training precision's dtype."""
    name = PRECISION_DTYPES[precision] if model_dtype_name == "auto" else model_dtype_name
    return TORCH_DTYPES[name]


def compute_dtype(model_dtype_name: str, precision: str) -> torch.dtype:
    """The dtype the trained models' matrix multiplies run in (what a GPU's peak FLOP/s is looked up for): a
    bf16/fp16 DeepSpeed engine casts its weights to that dtype; fp32 keeps them as loaded."""
    return model_dtype("auto" if precision != "fp32" else model_dtype_name, precision)
