"""The four PPO models: policy (trained, from the SFT checkpoint), reference (frozen copy of the same weights),
critic (trained, from the reward model: its scalar head read at every token) and reward model (frozen).

Trained models get DeepSpeed engines; frozen ones run as plain inference copies (frozen ZeRO stage 0) or as
ZeRO-3 inference engines (partitioned, optionally offloaded). Dropout is switched off in every model so that the
rollout's log-probs and values equal those of the first training forward (PPO's ratio starts at exactly 1).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch

from stages.checkpoint import keep_in_saved_config
from stages.config import ModelConfig, PPOConfig, TrainConfig
from stages.errors import CheckpointError
from stages.models import PAD, build_model, zero3_init_off
from stages.reward_model import RewardModel, positions_from_mask, score_in_float32


class ValueModel(torch.nn.Module):
    """V(prefix) at every position: the reward model's backbone and bias-free `score` head applied to every
    hidden state, [B, L] in float32. `seqcls` is the HF sequence-classification model that gets saved.

    The head computes in float32 even when the model is bf16/fp16 (`score_in_float32`): a bf16 value is rounded
    to steps of 0.016-0.03 at magnitude 2-8, more than a token's KL penalty, and GAE's
    delta_t = r_t + V(t+1) - V(t) would carry that rounding."""

    def __init__(self, seqcls: torch.nn.Module) -> None:
        super().__init__()
        self.seqcls = seqcls
        score_in_float32(seqcls)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.seqcls, self.seqcls.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.seqcls.score(hidden).squeeze(-1).float()


def is_dropout_name(name: str) -> bool:
    """A module attribute or config key that holds a dropout probability: its name contains `dropout` (GPT-2's
    `summary_first_dropout`, Starcoder2's `residual_dropout`, Bloom's `hidden_dropout`, BioGPT's
    `activation_dropout`), `pdrop` (`attn_pdrop`) or `layerdrop` (a probability of skipping a whole layer); also
    a mixture-of-experts router's train-mode noise on its input: `jitter_noise` (Mixtral's module attribute,
    from its config's router_jitter_noise; PhiMoE's `input_jitter_noise`) and `jitter_eps` (DBRX's
    `moe_jitter_eps`), but not PhiMoE's `router_jitter_noise`, a routing threshold that eval mode uses too."""
    name = name.lower()
    noise = name.endswith("jitter_noise") and name != "router_jitter_noise" or name.endswith("jitter_eps")
    return noise or any(part in name for part in ("dropout", "pdrop", "layerdrop"))


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability (and router jitter) of the model set to 0: nn.Dropout modules, float module
    attributes and config keys named as one (`is_dropout_name`; Falcon reads its config's in the forward); the
    config's own values are kept for the checkpoints (`keep_in_saved_config`), so a saved policy or critic has
    the dropout it was loaded with."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and is_dropout_name(name):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(config.to_dict().items()):
            if isinstance(value, float) and is_dropout_name(key):
                keep_in_saved_config(model, key, value)
                setattr(config, key, 0.0)


def check_tokenizers(policy_tok: Any, rm_tok: Any, rm_source: str, what: str = "the reward model",
                     fix: str = "train the RM from the policy's SFT checkpoint") -> None:
    """The reward model (or `what`: another model fed the policy's token ids) must read the policy's token ids
    as the same tokens: identical vocabularies (its own may add one `<|pad|>`, which train-rm adds when a
    tokenizer's pad is its EOS) and the same EOS id."""
    pv, rv = policy_tok.get_vocab(), rm_tok.get_vocab()
    extra = set(rv) - set(pv)
    if extra - {PAD} or set(pv) - set(rv):
        only = [f"{len(tokens)} only in {whose} (e.g. {sorted(tokens)[:3]})"
                for tokens, whose in ((extra - {PAD}, "its"), (set(pv) - set(rv), "the policy's")) if tokens]
        raise CheckpointError(f"{what} {rm_source} has a different vocabulary from the policy ({len(rv)} and "
                              f"{len(pv)} tokens; {', '.join(only)}); {fix}")
    bad = next((t for t in pv if pv[t] != rv[t]), None)
    if bad is not None:
        raise CheckpointError(
            f"token {bad!r} has id {pv[bad]} in the policy's tokenizer but {rv[bad]} in that of {what} ({rm_source})"
        )
    if policy_tok.eos_token_id != rm_tok.eos_token_id:
        raise CheckpointError(
            f"EOS differs: policy {policy_tok.eos_token!r} (id {policy_tok.eos_token_id}), {what} "
            f"{rm_tok.eos_token!r} (id {rm_tok.eos_token_id}) in {rm_source}"
        )


def stop_token_ids(policy: torch.nn.Module, tokenizer: Any, extra: list[int]) -> list[int]:
    """Ids that end a response: the tokenizer's EOS, the generation config's EOS id(s), and `extra`."""
    ids = {tokenizer.eos_token_id, *extra}
    gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def saved_stop_ids(model_dir: str | None, tokenizer: Any, extra: list[int]) -> list[int]:
    """`stop_token_ids` of the causal LM in the local folder `model_dir` without loading its weights: with the
    generation config transformers gives it on loading (its generation_config.json, else one made from its
    config.json); a folder with neither, a hub id or None: the tokenizer's EOS and `extra` only."""
    from pathlib import Path

    from transformers import AutoConfig, GenerationConfig

    folder, gen = Path(model_dir) if model_dir else None, None
    if folder is not None and (folder / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(folder))
    elif folder is not None and (folder / "config.json").is_file():
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))
    return stop_token_ids(types.SimpleNamespace(generation_config=gen), tokenizer, extra)


def engine_train_config(cfg: PPOConfig, lr: float) -> TrainConfig:
    """The TrainConfig an engine is built from: micro-batches of train.micro_batch_size, an optimizer step per
    mini-batch, the trick's global gradient clip."""
    t = cfg.train
    return TrainConfig(
        micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.mini_batch_size // t.micro_batch_size,
        lr=lr, weight_decay=t.weight_decay, adam_betas=t.adam_betas, adam_eps=t.adam_eps,
        lr_scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio,
        gradient_clipping=cfg.ppo.grad_clip,
    )


def frozen_ds_config(cfg: PPOConfig, world_size: int, on_gpu: bool) -> dict[str, Any] | None:
    """DeepSpeed JSON of a ZeRO-3 inference engine for the frozen models (None: plain copies)."""
    ds = cfg.deepspeed
    if ds.frozen_stage != 3:
        return None
    zero: dict[str, Any] = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    if ds.frozen_offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    micro = cfg.train.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size, "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"}, "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
    }


def freeze(model: torch.nn.Module, ds_config: dict[str, Any] | None, device: torch.device) -> Any:
    """An inference-only model: no gradients, eval mode; a ZeRO-3 engine when `ds_config` is given."""
    model.requires_grad_(False)
    disable_dropout(model)
    if ds_config is None:
        return model.to(device).eval()
    import deepspeed

    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.eval()
    return engine


def build_policy(cfg: PPOConfig, tokenizer: Any, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The policy (or, frozen, the reference) from `model`, dropout off."""
    model = build_model(cfg.model, tokenizer, cfg.deepspeed.precision, ds_config, cfg.seed, head="causal_lm")
    disable_dropout(model)
    return model


def build_reference(cfg: PPOConfig, tokenizer: Any, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The frozen reference: built as the policy is, then cast to the dtype the policy computes in (a bf16/fp16
    engine casts a policy loaded in float32 to its precision: `compute_dtype`), so that both give the same
    log-probs before the first update (KL 0) whatever model.dtype says. (Cast, not loaded in that dtype: a
    from_config model's random init in bf16 is not the bf16 rounding of its float32 init in every transformers
    version.) Parameters only, every one, as DeepSpeed 0.19 casts them (its keep-in-float32 rule covers
    buffers only): float32 buffers such as rotary inv_freq stay. A ZeRO-3 inference engine (`ds_config`) casts
    it itself."""
    from stages.engine import compute_dtype

    model = build_policy(cfg, tokenizer, ds_config)
    if not ds_config:
        dtype = compute_dtype(cfg.model.dtype, cfg.deepspeed.precision)
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model


def build_critic(cfg: PPOConfig, policy_tok: Any, rm_tok: Any, ds_config: dict[str, Any]) -> ValueModel:
    """From the reward model (critic_init: reward_model), or from the policy's checkpoint with a zero `score`
    head (critic_init: policy)."""
    if cfg.ppo.critic_init == "reward_model":
        seqcls = build_model(cfg.reward_model, rm_tok, cfg.deepspeed.precision, ds_config, cfg.seed, head="reward",
                             trained_head=True)
    else:
        seqcls = build_model(cfg.model, policy_tok, cfg.deepspeed.precision, ds_config, cfg.seed, head="reward")
        weight = seqcls.score.weight
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0) if hasattr(weight, "ds_id") else _null():
            with torch.no_grad():
                weight.zero_()
    head = getattr(seqcls, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise CheckpointError(f"{type(seqcls).__name__} has no linear `score` head with one output; cannot be a critic")
    disable_dropout(seqcls)
    return ValueModel(seqcls)


def build_reward(cfg: ModelConfig, rm_tok: Any, precision: str, ds_config: dict[str, Any], seed: int) -> RewardModel:
    """The reward model read at the last real token (see stages/reward_model.py)."""
    return RewardModel(build_model(cfg, rm_tok, precision, ds_config, seed, head="reward", trained_head=True))


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield


class GenerationCopy:
    """A plain copy of a ZeRO-3 policy for sampling: refreshed once per rollout by gathering one parameter at a
    time (never all at once), after which decoding runs without any collective per token."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        with zero3_init_off(), torch.device(device):  # built where it runs: its random init (overwritten by
            #                                             refresh) is then a GPU's work, not every rank's host's
            self.model = AutoModelForCausalLM.from_config(module.config, dtype=next(module.parameters()).dtype)
        self.model.generation_config = module.generation_config
        self.model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def refresh(self, module: torch.nn.Module) -> torch.nn.Module:
        import deepspeed

        own = dict(self.model.named_parameters())
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                own[name].copy_(param.data)
        return self.model
