"""Arithmetic estimate of accelerator memory per rank for a stage config (printed by `--dry-run`, compared
with the measured peak by `rlhf bench ppo`). N = parameters of a model, W = ranks, b = bytes per element of
the training precision (2 for bf16/fp16, 4 for fp32); H hidden size, I MLP width, K = kv heads x head size:

    weights         b N            / W with ZeRO-3;  0 with offload_param
    gradients       b N            / W with ZeRO-2/3;  0 with offload_optimizer (they are reduced into the CPU
                    partition bucket by bucket)
    fp32 gradients  mixed precision only: 4 N (ZeRO-0: DeepSpeed's bf16/fp16 optimizer wrapper keeps a float32
                    copy), 4 N / W (ZeRO-1/2/3: the float32 gradient partition); 0 with offload_optimizer
    optimizer       12 N (fp32 master + Adam m, v; 8 N in fp32 training)   / W with ZeRO-1/2/3; 0 with
                    offload_optimizer
    ZeRO-3 gather   b x (the largest parameter + DeepSpeed's 5e7-element prefetch bucket): whole parameters a
                    partitioned model holds while a layer runs
    activations     per micro-batch of m rows x L tokens, per layer, at 2-byte precision: (20 H + 8 I + 4 K) m L
                    bytes for a gated MLP (Llama, Qwen: RMSNorm's float32 input, q/k/v, the attention output,
                    gate, up, act(gate) and their product), 34 H m L otherwise (GPT, Korthikanti et al. 2022);
                    scaled by b / 2; with activation checkpointing only each layer's input (b m L H) plus one
                    layer in full. The gated form matches peaks measured on CPU for the Qwen2.5-0.5B / 1.5B and
                    Llama-2 shapes within 2 % (64, 67 and 45.5 x H bytes per token per layer)
    peak            everything held the whole run (weights, optimizer states, frozen models, KV cache) plus the
                    largest update: its gradients + max(activations + logits, float32 gradients) (`peak`)
    logits          PPO: float32 log-prob blocks, chunk x V x 4 x 3 (logits, softmax, gradient) with
                    train.logprob_chunk, else the model's m (P + R) V logits (b bytes) plus the float32 m R V
                    copies and gradients (8 bytes); SFT: the model's m L V logits, the trained rows' copy and
                    its gradient (3 b m L V) plus one float32 block (stages/lm.py checkpoints each)
    KV cache        2 x layers x K x (P + R) x B x b  (PPO rollouts of B prompts)
    frozen          b N per frozen model (PPO reference and reward model); / W when frozen_zero_stage is 3
    sampler         b N: the whole-policy copy PPO samples from under ZeRO-3

It ignores the CUDA context (~0.5 GiB), allocator fragmentation and the buffers of collectives (ZeRO-1/2's
gradient buckets, reduce_bucket_size elements each), so the measured peak is typically 10-30 % above it;
`rlhf bench` prints both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from stages.config import DeepSpeedConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig
from stages.errors import CheckpointError

GIB = 2**30


class Shape(NamedTuple):
    params: int
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # kv heads x head size
    intermediate: int = 0  # MLP width
    gated: bool = False  # gate and up projections (SwiGLU and kin)
    largest: int = 0  # elements of the largest parameter


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
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    named = dict(model.named_parameters())
    params = sum(p.numel() for p in named.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size
    gated = any("gate_proj" in name or "gate_up_proj" in name for name in named)
    return Shape(params, text.num_hidden_layers, text.hidden_size, text.vocab_size, kv * head_dim, width, gated,
                 max(p.numel() for p in named.values()))


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


#: DeepSpeed's default stage3_prefetch_bucket_size (elements)
PREFETCH_BUCKET = 50_000_000


def trained_model(n: int, ds: DeepSpeedConfig, world: int, largest: int = 0) -> dict[str, float]:
    """Weights, gradients (16-bit and float32) and optimizer states of one trained model per rank, and under
    ZeRO-3 the whole parameters gathered while a layer runs (bytes; see the module docstring)."""
    b, z, mixed = _bytes(ds.precision), ds.zero_stage, ds.precision != "fp32"
    weights = 0.0 if ds.offload_param else b * n / (world if z == 3 else 1)
    grads = 0.0 if ds.offload_optimizer and z >= 2 else b * n / (world if z >= 2 else 1)
    fp32_grads = 0.0 if ds.offload_optimizer or not mixed else 4 * n / (world if z >= 1 else 1)
    opt = 0.0 if ds.offload_optimizer else (12 if mixed else 8) * n / (world if z >= 1 else 1)
    parts = {"weights": weights, "gradients": grads, "fp32 gradients": fp32_grads, "optimizer": opt}
    if z == 3:
        parts["ZeRO-3 gathered parameters"] = b * (largest + min(PREFETCH_BUCKET, n))
    return parts


def activations(shape: Shape, rows: int, length: int, precision: str, checkpointing: bool) -> float:
    """Bytes autograd keeps for one micro-batch of `rows` x `length` tokens (see the module docstring)."""
    b = _bytes(precision)
    if shape.gated:
        per_token = 20 * shape.hidden + 8 * shape.intermediate + 4 * shape.kv_width
    else:
        per_token = 34 * shape.hidden
    per_layer = per_token * rows * length * b / 2
    if checkpointing:
        return b * rows * length * shape.hidden * shape.layers + per_layer
    return per_layer * shape.layers


def logit_bytes(shape: Shape, rows: int, scored: int, precision: str, chunk: int, context: int = 0) -> float:
    """Logit memory of log-probs of `scored` positions per row: with chunk > 0 one float32 block (logits,
    softmax, gradient); else the model's logits over all `context` + `scored` positions (b bytes) plus float32
    copies and gradients of the scored ones."""
    if chunk > 0:
        return min(chunk, rows * scored) * shape.vocab * 4 * 3
    return rows * shape.vocab * ((context + scored) * _bytes(precision) + scored * 8)


#: an update phase of a trained model: (its gradients, what the backward pass adds, what the optimizer step adds)
Phase = tuple[list[str], list[str], list[str]]


def phase_parts(phases: dict[str, Phase]) -> set[str]:
    """Names of the parts held only while a model updates."""
    return {name for phase in phases.values() for group in phase for name in group}


def peak(parts: dict[str, float], phases: dict[str, Phase]) -> float:
    """Bytes at the fullest moment: every part outside the phases (weights, optimizer states, frozen models, KV
    cache: held the whole run) plus the largest phase, gradients + max(backward: activations + logits, step:
    float32 gradients). Gradients are freed after each step and activations after each backward, so the
    phases do not add up."""
    inside = phase_parts(phases)
    held = sum(v for k, v in parts.items() if k not in inside)
    busiest = max((sum(parts[n] for n in grads) + max(sum(parts[n] for n in back), sum(parts[n] for n in step))
                   for grads, back, step in phases.values()), default=0.0)
    return held + busiest


def estimate_ppo(cfg: PPOConfig, world: int) -> dict[str, Any] | None:
    """Per-rank bytes of every component of a PPO run and the peak (None when a checkpoint's config is
    unreadable)."""
    policy, rm = model_shape(cfg.model), model_shape(cfg.reward_model)
    if policy is None or rm is None:
        return None
    ds, t = cfg.deepspeed, cfg.train
    b = _bytes(ds.precision)
    length = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
    parts: dict[str, float] = {}
    for name, shape in (("policy", policy), ("critic", rm)):
        for k, v in trained_model(shape.params, ds, world, shape.largest).items():
            parts[f"{name} {k}"] = v
    frozen_div = world if ds.frozen_stage == 3 else 1
    parts["reference weights"] = 0.0 if ds.frozen_offload_param else b * policy.params / frozen_div
    parts["reward model weights"] = 0.0 if ds.frozen_offload_param else b * rm.params / frozen_div
    if ds.zero_stage == 3:
        parts["sampling copy of the policy"] = b * policy.params
    parts["KV cache (rollout)"] = 2 * policy.layers * policy.kv_width * length * t.rollout_batch_size * b
    ckpt, m = cfg.model.gradient_checkpointing, t.micro_batch_size
    parts["activations (policy micro-batch)"] = activations(policy, m, length, ds.precision, ckpt)
    parts["logits (policy micro-batch)"] = logit_bytes(policy, m, cfg.generation.max_new_tokens,
                                                       ds.precision, t.logprob_chunk, cfg.data.max_prompt_length)
    parts["activations (critic micro-batch)"] = activations(rm, m, length, ds.precision, ckpt)
    phases = {name: ([f"{name} gradients"], [f"activations ({name} micro-batch)"] + logits, [f"{name} fp32 gradients"])
              for name, logits in (("policy", ["logits (policy micro-batch)"]), ("critic", []))}
    return {"parts": parts, "phases": phases, "total": peak(parts, phases), "world_size": world}


def estimate_lm_stage(cfg: SFTConfig | RMConfig, world: int, vocab_hint: int | None = None) -> dict[str, Any] | None:
    """Per-rank bytes of every component of an SFT or reward-model run and the peak."""
    shape = model_shape(cfg.model, vocab_hint)
    if shape is None:
        return None
    ds, t = cfg.deepspeed, cfg.train
    parts = {f"model {k}": v for k, v in trained_model(shape.params, ds, world, shape.largest).items()}
    rows = t.micro_batch_size * (2 if isinstance(cfg, RMConfig) else 1)  # chosen + rejected
    length = cfg.data.max_length
    parts["activations (micro-batch)"] = activations(shape, rows, length, ds.precision, cfg.model.gradient_checkpointing)
    if isinstance(cfg, SFTConfig):  # the model's logits, the trained rows' copy, its gradient; one float32 block
        parts["logits"] = 3 * rows * length * shape.vocab * _bytes(ds.precision) + logit_bytes(shape, rows, length,
                                                                                            ds.precision, 4096)
    elif cfg.loss.lm_coef > 0:  # LMHead: one checkpointed float32 block of the chosen rows at a time
        parts["logits"] = logit_bytes(shape, rows, length, ds.precision, 4096)
    backward = ["activations (micro-batch)"] + (["logits"] if "logits" in parts else [])
    phases = {"model": (["model gradients"], backward, ["model fp32 gradients"])}
    return {"parts": parts, "phases": phases, "total": peak(parts, phases), "world_size": world}


def estimate(cfg: Any, world: int) -> dict[str, Any] | None:
    if isinstance(cfg, PPOConfig):
        return estimate_ppo(cfg, world)
    if isinstance(cfg, (SFTConfig, RMConfig)):
        vocab = cfg.model.tokenizer_train.vocab_size if cfg.model.from_config is not None else None
        return estimate_lm_stage(cfg, world, vocab)
    return None


def format_estimate(est: dict[str, Any] | None) -> str:
    """A few lines: each component in GiB (those held only while a model updates marked *), then the peak."""
    if est is None:
        return "memory estimate: unavailable (the model's config.json cannot be read yet)"
    lines = [f"memory estimate per rank ({est['world_size']} rank(s); arithmetic, see stages/memory.py):"]
    inside = phase_parts(est["phases"])
    for name, value in est["parts"].items():
        if value:
            lines.append(f"  {name + (' *' if name in inside else ''):<38} {value / GIB:9.3f} GiB")
    lines.append(f"  {'peak':<38} {est['total'] / GIB:9.3f} GiB")
    lines.append("  (* only while its model updates: the peak holds everything else plus the largest update's "
                 "gradients and the larger of its backward pass's and its optimizer step's parts)")
    return "\n".join(lines)
