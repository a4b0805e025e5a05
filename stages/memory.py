"""Arithmetic estimate of accelerator memory per rank for a stage config (printed by `--dry-run`, compared
with the measured peak by `rlhf bench ppo`). N = parameters of a model, W = ranks, b = bytes per element of
the training precision (2 for bf16/fp16, 4 for fp32):

    weights      b N            / W with ZeRO-3;  0 with offload_param
    gradients    b N            / W with ZeRO-2/3
    optimizer    12 N (fp32 master + Adam m, v; 8 N in fp32 training)   / W with ZeRO-1/2/3; 0 with
                 offload_optimizer
    activations  per micro-batch of m rows x L tokens, per layer: 34 m L H bytes at 2-byte precision (the layer's
                 saved tensors with memory-efficient attention, Korthikanti et al. 2022), scaled by b / 2;
                 with activation checkpointing only each layer's input (b m L H) plus one layer in full
    logits       PPO: float32 log-prob blocks, chunk x V x 4 x 3 (logits, softmax, gradient) with
                 train.logprob_chunk, else m R V (b + 8); SFT: the model's m L V logits (b bytes) plus the
                 float32 loss blocks
    KV cache     2 x layers x kv_heads x head_dim x (P + R) x B x b  (PPO rollouts of B prompts)
    frozen       b N per frozen model (PPO reference and reward model); / W when frozen_zero_stage is 3
    sampler      b N: the whole-policy copy PPO samples from under ZeRO-3

It ignores the CUDA context (~0.5 GiB), allocator fragmentation and temporary buffers of collectives, so the
measured peak is typically 10-30 % above it; `rlhf bench` prints both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from stages.config import DeepSpeedConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig

GIB = 2**30


class Shape(NamedTuple):
    params: int
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # kv heads x head size


def model_shape(cfg: ModelConfig, vocab_hint: int | None = None) -> Shape | None:
    """Parameter count and sizes from the architecture (built on the meta device: no memory, no weights
    read, nothing downloaded: a hub id counts only when it is in the local cache); None when the checkpoint is
    not there yet (a later pipeline stage) or has no readable config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.models import resolve_model_dir

    try:
        if cfg.from_config is not None:
            arch = dict(cfg.from_config)
            arch.setdefault("vocab_size", vocab_hint or arch.get("vocab_size", 32000))
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        else:
            config = AutoConfig.from_pretrained(resolve_model_dir(cfg.name_or_path or ""), local_files_only=True,
                                                trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return Shape(params, text.num_hidden_layers, text.hidden_size, text.vocab_size, kv * head_dim)


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def trained_model(n: int, ds: DeepSpeedConfig, world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of one trained model per rank (bytes)."""
    b, z = _bytes(ds.precision), ds.zero_stage
    weights = 0.0 if ds.offload_param else b * n / (world if z == 3 else 1)
    grads = b * n / (world if z >= 2 else 1)
    opt = 0.0 if ds.offload_optimizer else (8 if ds.precision == "fp32" else 12) * n / (world if z >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": opt}


def activations(shape: Shape, rows: int, length: int, precision: str, checkpointing: bool) -> float:
    b = _bytes(precision)
    per_layer = 34 * rows * length * shape.hidden * b / 2
    if checkpointing:
        return b * rows * length * shape.hidden * shape.layers + per_layer
    return per_layer * shape.layers


def logit_bytes(shape: Shape, rows: int, scored: int, precision: str, chunk: int) -> float:
    if chunk > 0:
        return min(chunk, rows * scored) * shape.vocab * 4 * 3
    return rows * scored * shape.vocab * (_bytes(precision) + 8)


def estimate_ppo(cfg: PPOConfig, world: int) -> dict[str, Any] | None:
    """Per-rank bytes of every component of a PPO run (None when a checkpoint's config is unreadable)."""
    policy, rm = model_shape(cfg.model), model_shape(cfg.reward_model)
    if policy is None or rm is None:
        return None
    ds, t = cfg.deepspeed, cfg.train
    b = _bytes(ds.precision)
    length = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
    parts: dict[str, float] = {}
    for name, shape in (("policy", policy), ("critic", rm)):
        for k, v in trained_model(shape.params, ds, world).items():
            parts[f"{name} {k}"] = v
    frozen_div = world if ds.frozen_stage == 3 else 1
    parts["reference weights"] = 0.0 if ds.frozen_offload_param else b * policy.params / frozen_div
    parts["reward model weights"] = 0.0 if ds.frozen_offload_param else b * rm.params / frozen_div
    if ds.zero_stage == 3:
        parts["sampling copy of the policy"] = b * policy.params
    parts["KV cache (rollout)"] = 2 * policy.layers * policy.kv_width * length * t.rollout_batch_size * b
    ckpt = cfg.model.gradient_checkpointing
    parts["activations (policy micro-batch)"] = activations(policy, t.micro_batch_size, length, ds.precision, ckpt)
    parts["logits (policy micro-batch)"] = logit_bytes(policy, t.micro_batch_size, cfg.generation.max_new_tokens,
                                                       ds.precision, t.logprob_chunk)
    return {"parts": parts, "total": sum(parts.values()), "world_size": world}


def estimate_lm_stage(cfg: SFTConfig | RMConfig, world: int, vocab_hint: int | None = None) -> dict[str, Any] | None:
    """Per-rank bytes of an SFT or reward-model run."""
    shape = model_shape(cfg.model, vocab_hint)
    if shape is None:
        return None
    ds, t = cfg.deepspeed, cfg.train
    parts = {f"model {k}": v for k, v in trained_model(shape.params, ds, world).items()}
    rows = t.micro_batch_size * (2 if isinstance(cfg, RMConfig) else 1)  # chosen + rejected
    length = cfg.data.max_length
    parts["activations (micro-batch)"] = activations(shape, rows, length, ds.precision, cfg.model.gradient_checkpointing)
    if isinstance(cfg, SFTConfig):  # the model's logits of the whole micro-batch, then float32 blocks
        parts["logits"] = rows * length * shape.vocab * _bytes(ds.precision) + logit_bytes(shape, rows, length,
                                                                                        ds.precision, 4096)
    elif cfg.loss.lm_coef > 0:  # LMHead: float32 blocks of the chosen rows
        parts["logits (LM head blocks)"] = logit_bytes(shape, rows, length, ds.precision, 4096)
    return {"parts": parts, "total": sum(parts.values()), "world_size": world}


def estimate(cfg: Any, world: int) -> dict[str, Any] | None:
    if isinstance(cfg, PPOConfig):
        return estimate_ppo(cfg, world)
    if isinstance(cfg, (SFTConfig, RMConfig)):
        vocab = cfg.model.tokenizer_train.vocab_size if cfg.model.from_config is not None else None
        return estimate_lm_stage(cfg, world, vocab)
    return None


def format_estimate(est: dict[str, Any] | None) -> str:
    """A few lines: each component in GiB, then the total."""
    if est is None:
        return "memory estimate: unavailable (the model's config.json cannot be read yet)"
    lines = [f"memory estimate per rank ({est['world_size']} rank(s); arithmetic, see stages/memory.py):"]
    for name, value in est["parts"].items():
        if value:
            lines.append(f"  {name:<36} {value / GIB:9.3f} GiB")
    lines.append(f"  {'total':<36} {est['total'] / GIB:9.3f} GiB")
    return "\n".join(lines)
