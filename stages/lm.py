"""Causal-LM pieces shared by the stages: batching of tokenized rows and the masked token NLL."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.data import IGNORE


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Pads get label IGNORE and attention 0.

    Packed rows (with position_ids) get no attention mask: transformers builds a block-diagonal causal mask from
    position_ids restarting at 0. Their padding gets positions 0, 1, ... so it forms its own block."""
    width = max(len(r["input_ids"]) for r in rows)
    packed = "position_ids" in rows[0]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attn[i, :n] = 1
        if pos is not None:
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    if pos is not None:
        batch["position_ids"] = pos
    return {k: v.to(device) for k, v in batch.items()}


#: rows of logits the LM losses (SFT, the reward model's LM head) upcast to float32 at a time
LOSS_BLOCK_ROWS = 4096


def shifted_nll_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_BLOCK_ROWS) -> torch.Tensor:
    """Sum over trained positions of -log p(labels[t+1] | tokens <= t), in float32.

    Only rows of `logits` whose next label is not IGNORE are used, and they are upcast `chunk` rows at a time;
    with gradients each block is checkpointed (its float32 log-softmax recomputed in the backward pass), so
    autograd keeps no float32 [rows, vocab] tensor beyond the one block being worked on."""
    target = labels[:, 1:]
    keep = target != IGNORE
    picked = logits[:, :-1][keep]
    gold = target[keep]
    grad = torch.is_grad_enabled() and picked.requires_grad
    total = logits.new_zeros((), dtype=torch.float32)
    for rows, ids in zip(picked.split(chunk), gold.split(chunk)):  # split: one concatenation of the block grads
        total = total + (checkpoint(_nll_sum, rows, ids, use_reentrant=False) if grad else _nll_sum(rows, ids))
    return total


def _nll_sum(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(logits_i)[gold_i], in float32."""
    return F.cross_entropy(logits.float(), gold, reduction="sum")


def trained_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions that carry loss (labels shifted by one, as in shifted_nll_sum), a tensor on the
    labels' device (read nothing back to the host)."""
    return (labels[:, 1:] != IGNORE).sum()


def step_counts(batches: list[dict[str, torch.Tensor]], labels: str = "labels") -> torch.Tensor:
    """[trained positions, attended tokens] summed over a step's micro-batches, a float64 tensor on their device
    (all-reduced and read back once per step, rather than once per micro-batch and count)."""
    trained = sum(trained_token_count(b[labels]) for b in batches)
    tokens = sum(b["attention_mask"].sum() for b in batches)
    return torch.stack([trained, tokens]).double()


def lm_forward(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a (DeepSpeed-wrapped) causal LM for a collated batch, without a KV cache."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return engine(**kwargs).logits
