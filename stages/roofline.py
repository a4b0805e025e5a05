"""The fewest seconds each phase of a PPO iteration can take on a device (its roofline floor), and what bounds it.

A phase that must do W FLOPs and move Q bytes through device memory cannot take less than

    floor = max(W / peak FLOP/s, Q / memory bandwidth)

and the larger term names its bound ("flops" or "bandwidth"). `rlhf bench` divides the measured time by the
floor: the gap. A gap near 1 is the hardware limit; a large gap is time spent on neither arithmetic nor
necessary traffic (kernel launches and host waits, which `rlhf bench trace`'s GPU-busy column shows; extra
passes over memory; matrix products far from peak).

Counted for B prompts of P tokens, R new tokens each, L = P + R (`perf.py`'s FLOP conventions: body, head,
layers, width of `FlopShape`; attention as full L x L products):

    generation, the prefill:   W = 2 body B P + 2 head B + 4 layers B P^2 width     (LM head on the last
                               Q = weights + B P kv                                   position only)
    generation, decoding step k = 1 .. R-1 (context c = P + k):
                               W = 2 (body + head) B + 4 layers B c width
                               Q = weights + B c kv + 2 B V e
    scoring:                   forward FLOPs over B x L of the policy and the reference (head on R positions
                               per row) and of the critic and the reward model (no LM head)
    policy / critic update:    W = forward + backward FLOPs (`perf.train_flops`) over B x ppo_epochs rows, then
                               Q = 28 bytes per trained parameter per optimizer step (one mini-batch per epoch)

weights = the bytes of every weight a forward reads whole (input embedding tables are looked up, B rows a step,
and left out; a tied LM head is read whole as the head), kv = layers x 2 x kv_heads x head_dim x e bytes per
token of context, e = bytes per element, V = vocabulary: a decoding step reads every weight and the context's
keys and values once and writes and reads its logits once. Each generation step's floor is taken on its own
(the prefill is FLOP-bound, decoding at a small batch bandwidth-bound) and the steps summed. Scoring and the
forward + backward passes are FLOP floors (at these shapes they do hundreds of FLOPs per byte); the AdamW step
after them is a bandwidth floor of its own: it reads and writes the fp32 moments (16 bytes) and the fp32
weights (8; with bf16 weights, the fp32 master copy), reads the gradient and, with bf16 weights, writes them
(4 either way: an fp32 gradient, or a bf16 gradient and weight), 28 bytes per parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from stages.perf import FlopShape, flop_shape, train_flops


#: bytes an AdamW step moves per trained parameter (module docstring)
OPTIMIZER_BYTES = 28


class DecodeShape(NamedTuple):
    """What a decoding step of a causal LM reads and computes, besides its context's length; and what it trains."""

    flops: FlopShape
    weight_bytes: int  # weights read whole by one forward (input embedding tables excluded, LM head included)
    kv_bytes: int  # KV-cache bytes per token of context
    vocab: int
    element_bytes: int
    params: int  # parameters (a tied head counted once)
    separate_head: int  # parameters of an LM head that is not the input embedding table (0 when tied)


class Floor(NamedTuple):
    seconds: float
    flops: float
    bytes: float
    bound: str  # "flops" or "bandwidth"


def roofline(flops: float, nbytes: float, peak_tflops: float, bandwidth_tbs: float) -> Floor:
    """max(flops / peak, bytes / bandwidth) with its bound; peak in TFLOP/s, bandwidth in TB/s (10^12 bytes/s).

    >>> roofline(2e12, 1e12, 1000.0, 2.0)
    Floor(seconds=0.5, flops=2000000000000.0, bytes=1000000000000.0, bound='bandwidth')
    """
    compute, traffic = flops / (peak_tflops * 1e12), nbytes / (bandwidth_tbs * 1e12)
    return Floor(max(compute, traffic), flops, nbytes, "flops" if compute >= traffic else "bandwidth")


def total(floors: list[Floor]) -> Floor:
    """Phases run one after another: seconds, FLOPs and bytes add; the bound is the one of most seconds."""
    seconds = {b: sum(f.seconds for f in floors if f.bound == b) for b in ("flops", "bandwidth")}
    return Floor(sum(seconds.values()), sum(f.flops for f in floors), sum(f.bytes for f in floors),
                 max(seconds, key=lambda b: seconds[b]))


def forward_flops(shape: FlopShape, rows: int, length: int, scored: int) -> float:
    """FLOPs of one forward (a third of `train_flops`)."""
    return train_flops(shape, rows, length, scored) / 3.0


def decode_shape(model: torch.nn.Module) -> DecodeShape:
    """`DecodeShape` of a causal LM whose parameters are whole (not ZeRO-3 partitions), e.g. one built on the
    meta device (`meta_model`): only shapes are read."""
    config = model.config
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings().weight
    elements = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    elements += head.numel() if id(head) in embeddings else 0
    separate_head = 0 if id(head) in embeddings else head.numel()
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    e = head.element_size()
    return DecodeShape(flop_shape(model, lm_head=True), elements * e, layers * 2 * kv_heads * head_dim * e,
                       head.shape[0], e, sum(p.numel() for p in model.parameters()), separate_head)


def generation_floor(d: DecodeShape, batch: int, prompt: int, new: int, peak_tflops: float,
                     bandwidth_tbs: float) -> Floor:
    """The prefill and R - 1 decoding steps (module docstring), each step's floor on its own, summed."""
    s = d.flops
    steps = [roofline(2 * s.body * batch * prompt + 2 * s.head * batch + 4 * s.layers * batch * prompt**2 * s.width,
                      d.weight_bytes + batch * prompt * d.kv_bytes, peak_tflops, bandwidth_tbs)]
    for k in range(1, new):
        c = prompt + k
        steps.append(roofline(2 * (s.body + s.head) * batch + 4 * s.layers * batch * c * s.width,
                              d.weight_bytes + batch * c * d.kv_bytes + 2 * batch * d.vocab * d.element_bytes,
                              peak_tflops, bandwidth_tbs))
    return total(steps)


def value_shape(lm: FlopShape, hidden: int) -> FlopShape:
    """A value model (critic, reward model) of the LM's architecture: the body and a hidden x 1 score head."""
    return FlopShape(lm.body + hidden, 0, lm.layers, lm.width)


def ppo_floors(d: DecodeShape, hidden: int, batch: int, prompt: int, new: int, epochs: int, peak_tflops: float,
               bandwidth_tbs: float) -> dict[str, Floor]:
    """Floors of the phases of one PPO iteration whose four models share the policy's architecture (the bench
    workloads: one mini-batch per epoch): generation, scoring, policy_update, critic_update, and their sum,
    iteration. The critic trains the policy's parameters less a separate LM head, plus a hidden x 1 head."""
    lm, value = d.flops, value_shape(d.flops, hidden)
    length = prompt + new

    def flops_only(flops: float) -> Floor:
        return roofline(flops, 0.0, peak_tflops, bandwidth_tbs)

    def update(flops: float, params: int) -> Floor:  # forward + backward, then the optimizer steps
        return total([flops_only(flops), roofline(0.0, epochs * OPTIMIZER_BYTES * params, peak_tflops, bandwidth_tbs)])

    floors = {
        "generation": generation_floor(d, batch, prompt, new, peak_tflops, bandwidth_tbs),
        "scoring": flops_only(2 * forward_flops(lm, batch, length, new) + 2 * forward_flops(value, batch, length, 0)),
        "policy_update": update(train_flops(lm, batch * epochs, length, new), d.params),
        "critic_update": update(train_flops(value, batch * epochs, length, 0), d.params - d.separate_head + hidden),
    }
    return floors | {"iteration": total(list(floors.values()))}


def meta_model(config: Any, dtype: torch.dtype) -> Any:
    """A causal LM of `config` (a transformers config) on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def report(floors: dict[str, Floor], measured: dict[str, float | None]) -> dict[str, Any]:
    """JSON of floors next to measured seconds: {phase: {floor_s, bound, tflop, gbytes, gap}}; gap = measured
    / floor (None where either is missing)."""
    return {k: {"floor_s": f.seconds, "bound": f.bound, "tflop": f.flops / 1e12, "gbytes": f.bytes / 1e9,
                "gap": measured[k] / f.seconds if measured.get(k) and f.seconds else None}
            for k, f in floors.items()}
