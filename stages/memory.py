"""Arithmetic estimate of accelerator memory per rank for a stage config (printed by `--dry-run`, compared
with the measured peak by `rlhf bench ppo`). N = parameters of a model, W = ranks, b = bytes per element of
the training precision (2 for bf16/fp16, 4 for fp32); H hidden size, I MLP width, K = kv heads x head size:

    weights         b N            / W with ZeRO-3;  0 with offload_param
    optimizer       12 N (float32 master + Adam m, v) / W with ZeRO-1/2/3 (also in fp32 training: DeepSpeed
                    keeps a master copy); 8 N at ZeRO-0 fp32; 0 with offload_optimizer
    gradients       b N at ZeRO-0/1 (a N at ZeRO-1 when a = bytes of data_types.grad_accum_dtype differs);
                    a N / W at ZeRO-2/3 (the partition; 0 with offload_optimizer). ZeRO-3 allocates its
                    partition with the optimizer and keeps it; the others exist from the backward pass on
    reduce bucket   ZeRO-1/2 (contiguous_gradients): reduce_bucket_size elements (default 5e8: 0.93 GiB in
                    bf16), two with overlap_comm, from the backward pass on; ZeRO-3: one, held the whole run
    all-reduce      ZeRO-0: the engine all-reduces the gradients flattened, min(N, 5e8 + largest) elements;
                    ZeRO-1: reduced into a gradient partition (a N / W) at the end of the backward pass
    step            ZeRO-0 16-bit (FP16_Optimizer): a float32 copy of each gradient, joined per parameter
                    group: 4 N + 4 N; ZeRO-1/2/3: the gradient partition flattened (b N / W) and cast to float32
                    (4 N / W; ZeRO-3 per sub_group_size), none when ZeRO-2's partition is float32 already (only
                    the float32 flatten when ZeRO-3's is), none on the device with offload_optimizer. ZeRO-1 with
                    bf16 and grad_accum_dtype fp32 is DeepSpeed's BF16_Optimizer: a whole-model float32 gradient
                    buffer (4 N) held all run, and an all-reduce of 6 x min(N, 5e8 + largest) bytes instead
    norm            ZeRO-1/2/3 before the step (not DeepSpeed's BF16_Optimizer): each gradient slice of the
                    partition copied to float64 for its norm, one at a time: 8 x min(largest, N / W) (ZeRO-3: 8 x
                    largest / W); a moment of its own, above the step's copies when W is large; with
                    offload_optimizer taken in the backward pass instead (ZeRO-3: at most 2.5e8 elements at a time);
                    none at ZeRO-1/2 with zero_optimization.compute_grad_norm: false (DeepSpeed 0.19)
    reduce copies   ZeRO-2 accumulating in float32, in the backward pass (R = reduce_bucket_size, T = a tied
                    embedding's elements, `_float32_reduce`): a bucket is reduced into the float32 partition
                    flattened and cast slice by slice, b min(R, N) + 4 min(largest, R); the 16-bit gradients of
                    parameters larger than R are kept until the pass ends, b X (X = their elements; N / W without
                    contiguous_gradients); when N > R the gradient that fills a bucket, b min(largest, R), and a
                    tied embedding's first gradient, b T, held by autograd until its second comes at the end, where
                    both and their sum, 3 b T, make a moment of their own (less the sum when X counts it)
    offload         ZeRO-1/2 with offload_optimizer: a 16-bit staging buffer of the largest parameter
    ZeRO-3 gather   b x (the largest parameter + stage3_prefetch_bucket_size, default 5e7): whole parameters a
                    partitioned model holds while a layer runs
    activations     per micro-batch of m rows x L tokens, per layer, at 2-byte precision: (20 H + 8 I + 4 K) m L
                    bytes for a gated MLP (Llama, Qwen: RMSNorm's float32 input, q/k/v, the attention output,
                    gate, up, act(gate) and their product), 34 H m L otherwise (GPT, Korthikanti et al. 2022);
                    scaled by b / 2; with activation checkpointing only each layer's input (b m L H) plus one
                    layer in full. The gated form matches peaks measured on CPU for the Qwen2.5-0.5B / 1.5B and
                    Llama-2 shapes within 2 % (64, 67 and 45.5 x H bytes per token per layer). A padded batch
                    under sdpa attention adds b m L^2 per layer: every layer turns the [m, 1, L, L] mask into an
                    additive bias of the model's dtype and keeps it for the backward pass (measured on CPU;
                    2 L bytes per token per layer at 16 bits: +7 % at L = 2048 for Qwen2.5-0.5B). Every batch
                    counts as padded (an upper bound: an unpadded one has no mask)
    peak            everything held the whole run (weights, optimizer states, frozen models, KV cache) plus the
                    largest update: its gradients + its fullest moment (backward pass: activations, logits,
                    buckets; its end; the all-reduce; the norm; the optimizer step) (`peak`). Checked against DeepSpeed
                    0.19's own engines on CPU (tests/test_bench.py, ZeRO-0 to 3, bf16 and fp32, float32
                    accumulation): a census of live tensors after an update and after a backward pass, and the
                    allocation peak of an update
    logits          PPO: one float32 log-prob block of min(chunk, m R) rows with train.logprob_chunk, 16 bytes
                    per element (28 with the entropy; `logit_bytes`, measured), else the model's m R V response
                    logits and their gradient (2 b m R V) plus an 8-row float32 block; SFT: the model's m L V
                    logits, the trained rows' copy and its gradient (3 b m L V) plus one float32 cross-entropy
                    block of 12 bytes per element (stages/lm.py checkpoints each; `lm_loss_logits`)
    PTX             PPO with ptx_coef > 0: each policy micro-batch's loss adds the LM loss of m PTX rows of
                    data.ptx_max_length tokens (L_ptx) before one backward pass, so its activations and SFT's
                    logits term at L = L_ptx join the policy's backward moment
    KV cache        2 x layers x K x (P + R) x B x b  (PPO rollouts of B prompts)
    frozen          b N per frozen model (PPO reference and reward model; a reward_model.dtype of float32 in a
                    16-bit run: 4 N); / W when frozen_zero_stage is 3 (whose engine casts to b)
    sampler         b N: the whole-policy copy PPO samples from under ZeRO-3

The settings of a raw `deepspeed.config` that move memory are read (`ZeroTuning`). It counts tensors, as
torch.cuda.max_memory_allocated does (what `rlhf bench` measures and prints beside it): the allocator's reserve
beyond that (fragmentation), the CUDA context (~0.5 GiB) and the collectives' own buffers come on top, in
nvidia-smi's figure. Not modelled: the scoring forwards' blocks (12 bytes per element of min(chunk,
forward_batch_size x R) x V with the entropy, below the update's backward pass at the default sizes), ZeRO-3
parameters kept gathered for reuse (stage3_max_reuse_distance), a padded batch's K/V repeated to every query head
(views on CPU, no memory; CUDA's sdpa kernels unchecked), eager attention's attention matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from stages.config import DeepSpeedConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig, as_bool
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
    tied: int = 0  # elements of an input embedding the output layer shares (tie_word_embeddings); 0 when untied
    sizes: tuple[int, ...] = ()  # elements of every parameter, largest first


def tokenizer_vocab(cfg: ModelConfig) -> int | None:
    """The vocabulary a `from_config` model is built with (stages/models.py: the tokenizer's length): a given
    tokenizer's, read from disk or the local hub cache (never downloaded), else the size its trained tokenizer is
    asked for (an upper bound); None for a checkpoint (its config says) or a tokenizer that is not here."""
    if cfg.from_config is None:
        return None
    if cfg.tokenizer is None:
        return cfg.tokenizer_train.vocab_size
    from transformers import AutoTokenizer

    from stages.model_paths import resolve_model_dir
    from stages.models import load_tokenizer

    try:
        source = resolve_model_dir(cfg.tokenizer)
        if Path(source).expanduser().is_dir():
            return len(load_tokenizer(source, cfg.trust_remote_code))
        return len(AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                 trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError, KeyError, CheckpointError):
        return None


def model_shape(cfg: ModelConfig, vocab_hint: int | None = None) -> Shape | None:
    """Parameter count and sizes from the architecture (built on the meta device: no memory, no weights
    read, nothing downloaded: a hub id counts only when it is in the local cache), and whether its output layer is
    its input embedding (tied: one parameter, counted once); None when the checkpoint is not there yet (a later
    pipeline stage) or has no readable config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.model_paths import resolve_model_dir
    from stages.models import zero3_init_off

    try:
        if cfg.from_config is not None:
            arch = dict(cfg.from_config)
            arch["vocab_size"] = vocab_hint or 32000  # (the tokenizer's, when it can be told; from_config has none)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        else:
            config = AutoConfig.from_pretrained(resolve_model_dir(cfg.name_or_path or ""), local_files_only=True,
                                                trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"), zero3_init_off():  # (a ZeRO-3 run's set-up alive: no partitioning of meta)
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    named = dict(model.named_parameters())  # (a tied embedding once)
    sizes = tuple(sorted((p.numel() for p in named.values()), reverse=True))
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = embedding.weight.numel() if output is not None and output.weight is embedding.weight else 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size
    gated = any("gate_proj" in name or "gate_up_proj" in name for name in named)
    return Shape(sum(sizes), text.num_hidden_layers, text.hidden_size, text.vocab_size, kv * head_dim, width, gated,
                 sizes[0], tied, sizes)


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _frozen_bytes(model: ModelConfig, ds: DeepSpeedConfig, reference: bool) -> int:
    """Bytes per element of a frozen PPO model: the dtype it is loaded in (`model_dtype`), but the dtype the
    policy computes in (`compute_dtype`) for the reference (cast to it: `build_reference`) and for a
    frozen_zero_stage 3 engine (which casts its weights as the policy's engine does)."""
    from stages.engine import compute_dtype, model_dtype

    dtype = (compute_dtype if reference or ds.frozen_stage == 3 else model_dtype)(model.dtype, ds.precision)
    return dtype.itemsize


class ZeroTuning(NamedTuple):
    """The DeepSpeed settings besides the YAML's that move memory (read from `deepspeed.config`; DeepSpeed's
    defaults otherwise)."""

    reduce_bucket: int = 500_000_000  # zero_optimization.reduce_bucket_size (elements)
    prefetch_bucket: int = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size (elements)
    sub_group: int = 1_000_000_000  # zero_optimization.sub_group_size: ZeRO-3 steps this many at a time
    contiguous_gradients: bool = True
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only, where it adds no bucket)
    accum_bytes: int | None = None  # data_types.grad_accum_dtype; None: the training precision
    grad_norm: bool = True  # zero_optimization.compute_grad_norm: false skips ZeRO-1/2's norm (DeepSpeed >= 0.19)


def zero_tuning(ds: DeepSpeedConfig) -> ZeroTuning:
    """The memory-moving settings of a config's raw DeepSpeed JSON (see `ZeroTuning`)."""
    from stages.engine import ACCUM_DTYPES, accumulation_dtype, json_section, load_raw_deepspeed

    raw = load_raw_deepspeed(ds.config)
    zero = json_section(raw, ["zero_optimization"])
    accum = accumulation_dtype(raw)
    default = ZeroTuning()
    overlap = zero.get("overlap_comm")
    return ZeroTuning(int(float(zero.get("reduce_bucket_size", default.reduce_bucket))),
                      int(float(zero.get("stage3_prefetch_bucket_size", default.prefetch_bucket))),
                      int(float(zero.get("sub_group_size", default.sub_group))),
                      as_bool(zero.get("contiguous_gradients", True)),
                      None if overlap is None else as_bool(overlap),
                      _bytes(ACCUM_DTYPES[accum]) if accum in ACCUM_DTYPES else None,
                      as_bool(zero.get("compute_grad_norm", True)))


#: elements DeepSpeed's engine flattens at a time to all-reduce gradients outside ZeRO-1/2/3's own buckets
ALLREDUCE_BUCKET = 500_000_000


class Phase(NamedTuple):
    """A trained model's update: its gradients, and the moments of the update, each a list of the parts that
    exist together on top of them (the caller adds activations and logits to the backward pass)."""

    gradients: list[str]
    moments: dict[str, list[str]]


def trained_model(n: int, ds: DeepSpeedConfig, world: int, largest: int = 0, tuning: ZeroTuning = ZeroTuning(),
                  sizes: Sequence[int] = (), tied: int = 0) -> tuple[dict[str, float], Phase]:
    """Bytes per rank of one trained model's weights, gradients, optimizer states, buckets and the step's
    float32 gradients, and which of them exist only while it updates (its `Phase`; the rest are held the whole
    run). `sizes`: every parameter's elements (default: only the largest is known); `tied`: the elements of an
    input embedding whose output layer it also is, in the loss (0: none). See the module docstring; DeepSpeed
    0.19's optimizers, as read and measured."""
    b, z, offload = _bytes(ds.precision), ds.zero_stage, ds.offload_optimizer
    acc = tuning.accum_bytes or b
    split = world if z >= 1 else 1
    # ZeRO-1 with bf16 weights and float32 gradient accumulation (no offload) is DeepSpeed's BF16_Optimizer
    bf16_wrapper = z == 1 and ds.precision == "bf16" and acc == 4 and not offload
    parts = {"weights": 0.0 if ds.offload_param else b * n / (world if z == 3 else 1),
             # float32 master weights + Adam m, v; DeepSpeed keeps a float32 master copy at ZeRO >= 1 even for
             # float32 training
             "optimizer": 0.0 if offload else (8 if z == 0 and b == 4 else 12) * n / split}
    moments: dict[str, list[str]] = {"backward": [], "all-reduce": [], "step": []}
    grads = ["gradients"]
    if z == 0 or bf16_wrapper:
        parts["gradients"] = b * n
        if bf16_wrapper:  # a whole-model float32 gradient buffer from the start
            parts["fp32 gradient buffer"] = 4.0 * n
        # the engine all-reduces flattened gradients (even on one rank), cast to the communication dtype
        bucket = min(n, ALLREDUCE_BUCKET + largest)
        parts["all-reduce buffer"] = float((4 + 2) * bucket if bf16_wrapper else b * bucket)
        moments["all-reduce"] = ["all-reduce buffer"]
        if z == 0 and b == 2:  # FP16_Optimizer: a float32 copy of each gradient, then the group's joined copy
            parts["fp32 gradients"] = 4.0 * n
            parts["fp32 gradient pieces"] = 4.0 * n  # (the largest parameter group's, at most N)
            moments["step"] = ["fp32 gradients", "fp32 gradient pieces"]
    elif z in (1, 2):
        parts["gradients"] = 0.0 if offload and z == 2 else acc * n / (world if z == 2 else 1)
        if tuning.contiguous_gradients or offload:  # (overlap_comm is off by default below ZeRO-3)
            parts["reduce bucket"] = float((acc if z == 1 else b) * tuning.reduce_bucket
                                           * (2 if tuning.overlap_comm else 1))
            moments["backward"] = ["reduce bucket"]
        if z == 1 and tuning.contiguous_gradients and not offload:  # reduced into a partition at the end
            parts["gradient partition"] = acc * n / world
            moments["all-reduce"] = ["gradient partition", "reduce bucket"]
        # (compute_grad_norm: false skips the norm; DeepSpeed refuses it with offload)
        norm = _norm_copy(parts, min(largest, n / world)) if tuning.grad_norm or offload else []
        if offload:  # a 16-bit staging buffer of the largest parameter, on the device all run; each gradient
            parts["offload staging buffer"] = float(b * largest)  # slice's norm is taken in the backward pass
            moments["backward"] += norm
        else:
            moments["norm"] = norm
            if z == 2 and acc == 4 and b == 2:  # the float32 partition itself is stepped with
                _float32_reduce(parts, moments, b, n, world, largest, tuning, sizes, tied)
            else:
                moments["step"] = _step_copies(parts, b, n / world)
    else:
        grads = []  # ZeRO-3 allocates its gradient partition and its bucket with the optimizer
        parts["gradients"] = 0.0 if offload else acc * n / world
        if tuning.contiguous_gradients:
            parts["reduce bucket"] = float(b * tuning.reduce_bucket)
        parts["ZeRO-3 gathered parameters"] = b * (largest + min(tuning.prefetch_bucket, n))
        if not offload:  # (a float32 partition, accumulated so, is flattened as it is: no 16-bit copy)
            moments["step"] = _step_copies(parts, acc, min(n / world, tuning.sub_group))
            moments["norm"] = _norm_copy(parts, largest / world)
        else:  # each partition's norm is taken in the backward pass, 2.5e8 elements at a time
            moments["backward"] = _norm_copy(parts, min(largest / world, 250_000_000))
    return parts, Phase(grads, {k: v for k, v in moments.items() if v})


def _float32_reduce(parts: dict[str, float], moments: dict[str, list[str]], b: int, n: int, world: int,
                    largest: int, tuning: ZeroTuning, sizes: Sequence[int], tied: int) -> None:
    """ZeRO-2 accumulating b-byte gradients in its float32 partition: what its backward pass holds besides the
    reduce bucket, added to `parts`, to the pass's moment (`moments["backward"]`, a bucket reduced inside it) and
    to a moment of its end ("end of backward", with a tied embedding). R = reduce_bucket_size, L = the largest
    parameter, T = a tied embedding's elements (0 when untied):

        kept 16-bit gradients     b X: each parameter larger than R is reduced alone, outside the bucket, and its
                                  16-bit gradient kept until the pass ends; X = their elements (without
                                  contiguous_gradients every gradient of a rank's: N / W)
        bucket reduce copies      b min(R, N) + 4 min(L, R): a bucket reduced into the partition flattened and
                                  cast slice by slice
        gradients in flight       when N > R (a bucket fills inside the pass): b min(L, R), the gradient whose
                                  arrival fills it, + b T, a tied embedding's output-layer gradient, which autograd
                                  holds until the input layer's comes last (not when X counts T: one or the other)
        tied embedding gradients  at the end: its two gradients and their sum, 3 b T (2 b T when X counts the sum:
                                  T > R, or no contiguous_gradients)

    Against 36 update peaks measured on CPU (DeepSpeed 0.19.8, one rank: tied and untied models, buckets smaller
    than the largest parameter and larger than the model, overlap_comm, contiguous_gradients off): from 1.5 %
    below (a gradient more than twice a bucket is cast to float32 whole, 4 L, not counted) to 4 % above, leaving
    out what is not this function's (CPU kernels' scratch space, the 4-token batch's activations: up to 3.8 %);
    on more ranks an upper bound (a rank keeps only the large gradients its partition holds a slice of)."""
    bucket = tuning.reduce_bucket
    if tuning.contiguous_gradients:
        kept, tied_kept = sum(size for size in (sizes or [largest]) if size > bucket), tied > bucket
    else:
        kept, tied_kept = n / world, True
    if kept:
        parts["kept 16-bit gradients"] = float(b * kept)
        moments["backward"] += ["kept 16-bit gradients"]
    if tied:
        parts["tied embedding gradients"] = float((2 if tied_kept else 3) * b * tied)
        moments["end of backward"] = moments["backward"] + ["tied embedding gradients"]
    parts["bucket reduce copies"] = float(b * min(bucket, n) + 4 * min(largest, bucket))
    moments["backward"] += ["bucket reduce copies"]
    if n > bucket:
        parts["gradients in flight"] = float(b * min(largest, bucket) + (0 if tied_kept else b * tied))
        moments["backward"] += ["gradients in flight"]


def _norm_copy(parts: dict[str, float], elements: float) -> list[str]:
    """ZeRO's gradient norm (before the step; with optimizer offload in the backward pass): each gradient slice of
    the partition is copied to float64 for its norm, one at a time, so the largest (`elements`: the largest
    parameter, or a rank's share of it) at most."""
    parts["fp64 norm copy"] = 8 * elements
    return ["fp64 norm copy"]


def _step_copies(parts: dict[str, float], b: int, elements: float) -> list[str]:
    """ZeRO's optimizer step: the gradient partition flattened (a copy) and cast to float32 (a second one, in
    16-bit training), `elements` at a time; adds them to `parts` and names them."""
    parts["fp32 gradients"] = 4 * elements
    if b == 4:
        return ["fp32 gradients"]
    parts["flattened 16-bit gradients"] = b * elements
    return ["fp32 gradients", "flattened 16-bit gradients"]


def activations(shape: Shape, rows: int, length: int, precision: str, checkpointing: bool,
                masked: bool = False) -> float:
    """Bytes autograd keeps for one micro-batch of `rows` x `length` tokens (see the module docstring). `masked`:
    a padded batch under sdpa attention, whose [rows, 1, length, length] mask every layer turns into an additive
    bias of the model's dtype and keeps for its backward pass: b rows length^2 more per layer (`attention_masked`;
    an unpadded batch has no mask: causal attention without one)."""
    b = _bytes(precision)
    if shape.gated:
        per_token = 20 * shape.hidden + 8 * shape.intermediate + 4 * shape.kv_width
    else:
        per_token = 34 * shape.hidden
    per_layer = per_token * rows * length * b / 2 + (b * rows * length * length if masked else 0)
    if checkpointing:
        return b * rows * length * shape.hidden * shape.layers + per_layer
    return per_layer * shape.layers


#: bytes per element of a checkpointed float32 log-prob block at its recomputation in the backward pass, without
#: and with the entropy: the float32 logits and logsumexp's backward (sub, exp and mul results alive at once)
#: are 16; the entropy's terms bring it to 28 (torch.profiler on `rollout._head_logprobs`, tests/test_bench.py)
LOGPROB_BLOCK = {False: 16, True: 28}
#: the same for the full-logits path's float32 blocks of 8 rows (`rollout.token_logprobs`), measured beside the
#: model's logits and their gradient (b bytes each per element): 16, and 24 with the entropy
FULL_LOGITS_BLOCK = {False: 16, True: 24}
#: SFT's and the reward model's LM loss, a checkpointed float32 cross-entropy block (`lm._nll_sum`): 12
LM_LOSS_BLOCK = 12


def attention_masked(model: ModelConfig) -> bool:
    """Whether a model's forwards keep an attention mask per layer (`activations`), every batch counting as
    padded: under sdpa attention (flash_attention_2 unpads instead; eager keeps whole attention matrices, not
    modelled)."""
    return model.attn_implementation == "sdpa"


def logit_bytes(shape: Shape, rows: int, scored: int, precision: str, chunk: int, entropy: bool = False) -> float:
    """Logit memory of the policy's log-probs of `scored` positions per row at their backward pass: with
    chunk > 0 one [min(chunk, rows x scored), V] block of LOGPROB_BLOCK bytes per element; else the model's
    logits of the scored positions and their gradient (2 b rows scored V) plus one 8-row float32 block."""
    if chunk > 0:
        return min(chunk, rows * scored) * shape.vocab * LOGPROB_BLOCK[entropy]
    return rows * scored * shape.vocab * 2 * _bytes(precision) + min(8, rows) * scored * shape.vocab * \
        FULL_LOGITS_BLOCK[entropy]


def lm_loss_logits(shape: Shape, rows: int, length: int, precision: str) -> float:
    """Logit memory of an LM loss over `rows` x `length` tokens at its backward pass (SFT, PPO's PTX term): the
    model's logits, the trained rows' copy and its gradient (3 b rows length V), plus one checkpointed float32
    cross-entropy block of LOSS_BLOCK_ROWS rows (stages/lm.py)."""
    from stages.lm import LOSS_BLOCK_ROWS

    block = min(LOSS_BLOCK_ROWS, rows * length) * shape.vocab * LM_LOSS_BLOCK
    return 3 * rows * length * shape.vocab * _bytes(precision) + block


def _named(model: str, phase: Phase) -> Phase:
    """A `trained_model` phase with its part names prefixed by the model's."""
    return Phase([f"{model} {part}" for part in phase.gradients],
                 {moment: [f"{model} {part}" for part in names] for moment, names in phase.moments.items()})


def phase_parts(phases: dict[str, Phase]) -> set[str]:
    """Names of the parts held only while a model updates."""
    return {name for phase in phases.values()
            for name in phase.gradients + [part for names in phase.moments.values() for part in names]}


def peak(parts: dict[str, float], phases: dict[str, Phase]) -> float:
    """Bytes at the fullest moment: every part outside the phases (weights, optimizer states, frozen models, KV
    cache: held the whole run) plus the largest phase, its gradients + its fullest moment (backward pass:
    activations, logits, reduce buckets; the end of the backward pass, ZeRO-2 in float32: a tied embedding's
    gradients; the gradient all-reduce; the gradient norm's float64 copy; the optimizer step: float32 gradients).
    Activations are freed by the end of the backward pass and the step's copies at its end, so the moments do
    not add up."""
    inside = phase_parts(phases)
    held = sum(v for k, v in parts.items() if k not in inside)
    busiest = max((sum(parts[n] for n in phase.gradients)
                   + max((sum(parts[n] for n in names) for names in phase.moments.values()), default=0.0)
                   for phase in phases.values()), default=0.0)
    return held + busiest


def estimate_ppo(cfg: PPOConfig, world: int, micro_batch_sizes: Sequence[int] = ()) -> dict[str, Any] | None:
    """Per-rank bytes of every component of a PPO run and the peak (None when a checkpoint's config is
    unreadable); `peak_at_micro_batch`: the peak at each of `micro_batch_sizes` instead of train.micro_batch_size
    (the shapes read once)."""
    policy = model_shape(cfg.model, tokenizer_vocab(cfg.model))
    rm = model_shape(cfg.reward_model, tokenizer_vocab(cfg.reward_model))
    if policy is None or rm is None:
        return None
    return _at_micro_batches(lambda m: _ppo_parts(cfg, world, policy, rm, m), cfg.train.micro_batch_size,
                             micro_batch_sizes)


def _at_micro_batches(parts_at: Callable[[int], dict[str, Any]], micro: int, others: Sequence[int]) -> dict[str, Any]:
    """The estimate at micro-batches of `micro`, with `peak_at_micro_batch`: the peak at each of `others`."""
    est = parts_at(micro)
    est["peak_at_micro_batch"] = {m: parts_at(m)["total"] for m in others}
    return est


def _ppo_parts(cfg: PPOConfig, world: int, policy: Shape, rm: Shape, m: int) -> dict[str, Any]:
    """`estimate_ppo`'s parts, phases and peak at micro-batches of `m` rollouts."""
    ds, t = cfg.deepspeed, cfg.train
    b = _bytes(ds.precision)
    length = cfg.data.max_prompt_length + cfg.generation.max_new_tokens
    parts: dict[str, float] = {}
    phases: dict[str, Phase] = {}
    tuning = zero_tuning(ds)
    # the critic is a copy of the reward model, or with ppo.critic_init: policy of the policy (a one-output head)
    critic, critic_cfg = (policy, cfg.model) if cfg.ppo.critic_init == "policy" else (rm, cfg.reward_model)
    # (the critic's value head replaces the output layer: no tied embedding)
    for name, shape, tied in (("policy", policy, policy.tied), ("critic", critic, 0)):
        own, phase = trained_model(shape.params, ds, world, shape.largest, tuning, shape.sizes, tied)
        parts.update({f"{name} {k}": v for k, v in own.items()})
        phases[name] = _named(name, phase)
    frozen_div = world if ds.frozen_stage == 3 else 1
    for name, shape, model, reference in (("reference", policy, cfg.model, True),
                                          ("reward model", rm, cfg.reward_model, False)):
        size = _frozen_bytes(model, ds, reference) * shape.params / frozen_div
        parts[f"{name} weights"] = 0.0 if ds.frozen_offload_param else size
    if ds.zero_stage == 3:
        parts["sampling copy of the policy"] = b * policy.params
    parts["KV cache (rollout)"] = 2 * policy.layers * policy.kv_width * length * t.rollout_batch_size * b
    ckpt = cfg.model.gradient_checkpointing
    # rollouts count as padded: prompts of other lengths are left-padded, shorter responses right-padded (the
    # benchmarks' are neither, but at their lengths the mask is 1 % of the activations)
    parts["activations (policy micro-batch)"] = activations(policy, m, length, ds.precision, ckpt,
                                                            attention_masked(cfg.model))
    parts["logits (policy micro-batch)"] = logit_bytes(policy, m, cfg.generation.max_new_tokens,
                                                       ds.precision, t.logprob_chunk, cfg.ppo.entropy_coef > 0)
    policy_backward = ["activations (policy micro-batch)", "logits (policy micro-batch)"]
    if cfg.ppo.ptx_coef > 0 and cfg.data.ptx is not None:  # its LM loss joins each policy micro-batch's backward
        parts["activations (PTX micro-batch)"] = activations(policy, m, cfg.data.ptx_max_length, ds.precision, ckpt,
                                                             attention_masked(cfg.model))
        parts["logits (PTX micro-batch)"] = lm_loss_logits(policy, m, cfg.data.ptx_max_length, ds.precision)
        policy_backward += ["activations (PTX micro-batch)", "logits (PTX micro-batch)"]
    parts["activations (critic micro-batch)"] = activations(critic, m, length, ds.precision, ckpt,
                                                            attention_masked(critic_cfg))
    phases["policy"].moments.setdefault("backward", []).extend(policy_backward)
    phases["critic"].moments.setdefault("backward", []).append("activations (critic micro-batch)")
    return {"parts": parts, "phases": phases, "total": peak(parts, phases), "world_size": world}


def estimate_lm_stage(cfg: SFTConfig | RMConfig, world: int, vocab_hint: int | None = None,
                      micro_batch_sizes: Sequence[int] = ()) -> dict[str, Any] | None:
    """Per-rank bytes of every component of an SFT or reward-model run and the peak; `peak_at_micro_batch` as
    in `estimate_ppo`."""
    shape = model_shape(cfg.model, vocab_hint)
    if shape is None:
        return None
    return _at_micro_batches(lambda m: _lm_stage_parts(cfg, world, shape, m), cfg.train.micro_batch_size,
                             micro_batch_sizes)


def _lm_stage_parts(cfg: SFTConfig | RMConfig, world: int, shape: Shape, micro: int) -> dict[str, Any]:
    """`estimate_lm_stage`'s parts, phases and peak at micro-batches of `micro` examples (pairs for the RM)."""
    from stages.lm import LOSS_BLOCK_ROWS

    ds = cfg.deepspeed
    # a reward model's score head replaces the output layer; its LM loss (lm_coef) uses the tied embedding again
    tied = shape.tied if isinstance(cfg, SFTConfig) or cfg.loss.lm_coef > 0 else 0
    own, phase = trained_model(shape.params, ds, world, shape.largest, zero_tuning(ds), shape.sizes, tied)
    parts = {f"model {k}": v for k, v in own.items()}
    rows = micro * (2 if isinstance(cfg, RMConfig) else 1)  # chosen + rejected
    length = cfg.data.max_length
    parts["activations (micro-batch)"] = activations(shape, rows, length, ds.precision, cfg.model.gradient_checkpointing,
                                                     attention_masked(cfg.model))  # (rows padded to the longest)
    if isinstance(cfg, SFTConfig):
        parts["logits"] = lm_loss_logits(shape, rows, length, ds.precision)
    elif cfg.loss.lm_coef > 0:  # LMHead: one checkpointed float32 block of the chosen rows at a time
        parts["logits"] = min(LOSS_BLOCK_ROWS, micro * length) * shape.vocab * LM_LOSS_BLOCK
    phases = {"model": _named("model", phase)}
    phases["model"].moments.setdefault("backward", []).extend(
        ["activations (micro-batch)"] + (["logits"] if "logits" in parts else []))
    return {"parts": parts, "phases": phases, "total": peak(parts, phases), "world_size": world}


def estimate(cfg: Any, world: int, micro_batch_sizes: Sequence[int] = ()) -> dict[str, Any] | None:
    """The estimate of a stage config (None for another kind, or when a model's config.json cannot be read)."""
    if isinstance(cfg, PPOConfig):
        return estimate_ppo(cfg, world, micro_batch_sizes)
    if isinstance(cfg, (SFTConfig, RMConfig)):
        return estimate_lm_stage(cfg, world, tokenizer_vocab(cfg.model), micro_batch_sizes)
    return None


def format_estimate(est: dict[str, Any] | None) -> str:
    """A few lines: each component in GiB (those held only while a model updates marked *), then the peak."""
    if est is None:
        return ("memory estimate: unavailable (no config.json to read: the model is neither a local folder nor a hub "
                "model in the local cache, or an earlier stage has yet to write it)")
    lines = [f"memory estimate per rank ({est['world_size']} rank(s); arithmetic, see stages/memory.py):"]
    inside = phase_parts(est["phases"])
    for name, value in est["parts"].items():
        if value:
            lines.append(f"  {name + (' *' if name in inside else ''):<38} {value / GIB:9.3f} GiB")
    lines.append(f"  {'peak':<38} {est['total'] / GIB:9.3f} GiB")
    lines.append("  (* only while its model updates: the peak holds everything else plus the largest update's "
                 "gradients and its fullest moment: the backward pass, the gradient all-reduce or the optimizer step)")
    return "\n".join(lines)


#: share of a GPU's memory the estimate may fill: it counts tensors only, and the CUDA context (~0.5 GiB), the
#: caching allocator's reserve beyond the tensors it holds (fragmentation) and NCCL's buffers take the rest
USABLE_FRACTION = 0.9


def fits(peak_bytes: float, gpu_bytes: int) -> bool:
    """Whether an estimated peak fits a GPU of `gpu_bytes`: at most USABLE_FRACTION of it."""
    return peak_bytes <= USABLE_FRACTION * gpu_bytes


def fit_verdict(peak_bytes: float, gpu_bytes: int) -> str:
    """`fits` said with its margin: "fits (S GiB to spare)" or "does not fit (O GiB over)", against USABLE_FRACTION
    of the GPU."""
    spare = (USABLE_FRACTION * gpu_bytes - peak_bytes) / GIB
    return f"fits ({spare:.3f} GiB to spare)" if fits(peak_bytes, gpu_bytes) else f"does not fit ({-spare:.3f} GiB over)"


def per_rank_batch(cfg: Any) -> tuple[int, str]:
    """Rows per rank of one optimizer step, which its micro-batches split, and the keys that set them: PPO's
    train.mini_batch_size; SFT's and the reward model's micro_batch_size x gradient_accumulation_steps."""
    t = cfg.train
    if isinstance(cfg, PPOConfig):
        return t.mini_batch_size, f"train.mini_batch_size = {t.mini_batch_size}"
    n = t.micro_batch_size * t.gradient_accumulation_steps
    return n, f"micro_batch_size x gradient_accumulation_steps = {n}"


def micro_batch_choices(cfg: Any) -> list[int]:
    """The micro-batch sizes that split `per_rank_batch` evenly (the same optimizer steps), ascending."""
    n, _ = per_rank_batch(cfg)
    return [m for m in range(1, n + 1) if n % m == 0]


def micro_batch_keys(cfg: Any, micro: int) -> dict[str, int]:
    """The train keys that make micro-batches of `micro` rows split the same `per_rank_batch` rows per optimizer
    step: train.micro_batch_size, and for SFT/RM train.gradient_accumulation_steps = rows / micro."""
    keys = {"train.micro_batch_size": micro}
    if not isinstance(cfg, PPOConfig):
        keys["train.gradient_accumulation_steps"] = per_rank_batch(cfg)[0] // micro
    return keys


def largest_fitting_micro_batch(est: dict[str, Any], gpu_bytes: int) -> int | None:
    """The largest micro-batch size whose estimated peak (`est["peak_at_micro_batch"]`, over
    `micro_batch_choices`) fits a GPU of `gpu_bytes`; None when none does."""
    return max((m for m, value in est["peak_at_micro_batch"].items() if fits(value, gpu_bytes)), default=None)


def fit_choice(est: dict[str, Any], gpu_bytes: int) -> tuple[int, bool]:
    """The micro-batch --fit-micro-batch chooses for a GPU of `gpu_bytes`, and whether its peak fits: the largest
    that fits (`largest_fitting_micro_batch`), else 1, the smallest of `micro_batch_choices`."""
    best = largest_fitting_micro_batch(est, gpu_bytes)
    return (best, True) if best is not None else (1, False)


def format_fit(est: dict[str, Any], cfg: Any, gpu_bytes: int, source: str) -> str:
    """Whether the estimate's peak fits USABLE_FRACTION of a GPU of `gpu_bytes`, and the largest micro-batch size
    among `micro_batch_choices` whose peak (`est["peak_at_micro_batch"]`) does: a run trains the same with it
    (SFT/RM: with the gradient accumulation that keeps micro x accumulation)."""
    usable = USABLE_FRACTION * gpu_bytes
    total = est["total"]
    lines = [f"GPU memory: {gpu_bytes / GIB:.3f} GiB per GPU ({source}); the estimate may fill "
             f"{USABLE_FRACTION:.0%} of it, {usable / GIB:.3f} GiB (the CUDA context, the allocator's reserve and "
             "NCCL buffers take the rest)"]
    lines.append(f"  the peak, {total / GIB:.3f} GiB, {fit_verdict(total, gpu_bytes)}")
    _, keys = per_rank_batch(cfg)
    best, t = largest_fitting_micro_batch(est, gpu_bytes), cfg.train
    if best is None:
        lines.append(f"  no train.micro_batch_size fits with the same batch ({keys})")
        return "\n".join(lines)
    if best == t.micro_batch_size:
        lines.append(f"  the largest train.micro_batch_size that fits with the same batch ({keys}): {best} (this "
                     "config's)")
        return "\n".join(lines)
    accumulation = "" if isinstance(cfg, PPOConfig) else (
        f", with gradient_accumulation_steps {micro_batch_keys(cfg, best)['train.gradient_accumulation_steps']} "
        f"(now {t.gradient_accumulation_steps})")
    lines.append(f"  the largest train.micro_batch_size that fits with the same batch ({keys}): {best} (now "
                 f"{t.micro_batch_size}){accumulation}; --fit-micro-batch sets it (a --resume keeps "
                 "its run's without --allow-config-change)")
    return "\n".join(lines)


def memory_advice(cfg: Any) -> str:
    """What lowers a stage's GPU memory that its config does not do yet: smaller micro-batches (with gradient
    accumulation for the same batch), PPO's scoring and rollout batches, SFT/RM's evaluation micro-batch,
    activation checkpointing, a higher ZeRO stage (over more GPUs), optimizer / parameter offload."""
    t, ds = cfg.train, cfg.deepspeed
    ways = [f"a smaller train.micro_batch_size (now {t.micro_batch_size})"] if t.micro_batch_size > 1 else []
    if isinstance(cfg, PPOConfig):
        ways.append("a smaller train.forward_batch_size (the scoring forwards) or train.rollout_batch_size (the "
                    "sampling's KV cache)")
    else:
        ways.append("a smaller train.eval_micro_batch_size (evaluation)")
    if not cfg.model.gradient_checkpointing:
        ways.append("model.gradient_checkpointing: true")
    if ds.zero_stage < 3:
        ways.append(f"a higher deepspeed.zero_stage (now {ds.zero_stage}; it partitions over the GPUs)")
    if not ds.offload_optimizer:
        ways.append("deepspeed.offload_optimizer: true")
    if ds.zero_stage == 3 and not ds.offload_param:
        ways.append("deepspeed.offload_param: true")
    return "; ".join(ways)
