"""The reward model: a Hugging Face sequence-classification model (backbone + bias-free linear `score` head
h -> 1) read at the last real token, plus an optional LM head for the LM loss on chosen responses.

    r(x) = w . h_T(x),   T = the last position whose attention mask is 1 (left or right padding alike)

The saved checkpoint is the plain `AutoModelForSequenceClassification` directory (num_labels=1, pad_token_id
set, pad distinct from EOS), so transformers' own pooling (the last non-pad token) reads the same position.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.config import ModelConfig
from stages.data import IGNORE
from stages.errors import CheckpointError
from stages.lm import LOSS_BLOCK_ROWS
from stages.model_paths import resolve_model_dir
from stages.models import build_model

REWARD_STATS_FILE = "reward_stats.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row: L - 1 - argmax(flip(mask)).

    >>> last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist()
    [1, 2]
    """
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).to(torch.int32).argmax(dim=1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (0 at each row's first real token), so a left-padded row gets
    the same positions as the same row right-padded. (Left pads get 0, right pads repeat the last position;
    both are masked.)"""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LMHead(torch.nn.Module):
    """The LM loss head: summed NLL of `gold` tokens given hidden rows, logits = h W^T.

    One call per micro-batch (ZeRO-3 gathers W once per module call, and every rank must make the same number
    of calls); inside, logits are made and upcast `chunk` rows at a time, each block checkpointed (recomputed in
    the backward pass), so autograd keeps no [tokens, vocab] logits, 16-bit or float32, beyond the block being
    worked on. W is the input embedding (tied models) or a matrix of its own."""

    def __init__(self, weight: torch.nn.Parameter, chunk: int = LOSS_BLOCK_ROWS) -> None:
        super().__init__()
        self.weight = weight
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        # starts from a term that touches W even when there is no token, so every rank's backward reaches W
        # (summed in float32: a 16-bit sum of a vocabulary's logits overflows fp16 to inf, and inf x 0 is NaN)
        nll = F.linear(hidden[:1], self.weight).sum(dtype=torch.float32) * 0.0
        grad = torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad)
        for rows, ids in zip(hidden.split(self.chunk), gold.split(self.chunk)):
            args = (rows, self.weight, ids)
            nll = nll + (checkpoint(linear_nll_sum, *args, use_reentrant=False) if grad else linear_nll_sum(*args))
        return nll


def linear_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(h_i W^T)[gold_i], the logits upcast to float32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), gold, reduction="sum")


def float32_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear's forward in float32 whatever its weights' dtype: x W^T (+ b) with x, W, b upcast."""
    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias)


def score_in_float32(seqcls: torch.nn.Module) -> None:
    """Make `seqcls.score` (the scalar head) compute in float32 even in a bf16/fp16 model: a bf16 score of
    magnitude 2-8 is rounded to steps of 0.016-0.03 (a reward model's pairs then tie more often, and a critic's
    GAE deltas carry the rounding). Only the head's forward is replaced: its weights keep their dtype, DeepSpeed's
    ZeRO-3 hooks on the module still gather them, and the saved checkpoint is unchanged."""
    seqcls.score.forward = types.MethodType(float32_linear, seqcls.score)


class RewardModel(torch.nn.Module):
    """`seqcls` is the HF sequence-classification model that gets saved; `lm_head` (optional) maps hidden states
    to vocabulary logits for the LM loss and is not part of the saved reward model. The score head computes in
    float32 (`score_in_float32`)."""

    def __init__(self, seqcls: torch.nn.Module, lm_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.seqcls = seqcls
        self.lm_head = lm_head
        score_in_float32(seqcls)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rewards [B] in float32, summed LM NLL over positions whose next label is not IGNORE, or None).

        NLL = sum_t -log p(labels[t+1] | tokens <= t)."""
        backbone = getattr(self.seqcls, self.seqcls.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        rewards = self.seqcls.score(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()
        if lm_labels is None:
            return rewards, None
        if self.lm_head is None:
            raise ValueError("this reward model was built without an LM head")
        target = lm_labels[:, 1:]
        keep = target != IGNORE
        return rewards, self.lm_head(hidden[:, :-1][keep], target[keep])


def _score_head(model: torch.nn.Module) -> None:
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1 or head.bias is not None:
        raise CheckpointError(
            f"{type(model).__name__} has no bias-free linear `score` head with one output; "
            "use a decoder architecture whose sequence-classification model has one (Llama, Qwen2, Mistral, ...)"
        )


def _source_lm_head(cfg: ModelConfig) -> torch.Tensor | None:
    """The `lm_head.weight` tensor of the source checkpoint (None when it has none, e.g. tied embeddings)."""
    from safetensors import safe_open

    if cfg.name_or_path is None:
        return None
    source = Path(resolve_model_dir(cfg.name_or_path))
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    if not files and not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(cfg.name_or_path, allow_patterns=["*.safetensors", "*.json"]))
        files = sorted(source.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            if "lm_head.weight" in fh.keys():
                return fh.get_tensor("lm_head.weight")
    return None


def build_reward_model(
    cfg: ModelConfig,
    tokenizer: Any,
    precision: str,
    ds_config: dict[str, Any],
    seed: int,
    with_lm_head: bool,
    resize: bool,
) -> RewardModel:
    """The trainable reward model. With `with_lm_head`: tied embeddings share the input embedding; otherwise the
    source checkpoint's `lm_head.weight` is loaded (a random-init head for from_config), trained along."""
    seqcls = build_model(cfg, tokenizer, precision, ds_config, seed, head="reward", resize=resize)
    _score_head(seqcls)
    lm_head: torch.nn.Module | None = None
    if with_lm_head:
        embed = seqcls.get_input_embeddings()
        if getattr(seqcls.config.get_text_config(), "tie_word_embeddings", False):
            lm_head = LMHead(embed.weight)
        else:
            rows, width = getattr(embed.weight, "ds_shape", embed.weight.shape)
            weight = _source_lm_head(cfg)
            if weight is None and cfg.from_config is None:
                raise CheckpointError(
                    f"loss.lm_coef > 0 needs the LM head of {cfg.name_or_path}, but none of its *.safetensors files "
                    "holds lm_head.weight (a reward-model checkpoint? .bin weights?); start from the SFT model "
                    "or set loss.lm_coef: 0"
                )
            own = torch.zeros(rows, width, dtype=embed.weight.dtype)
            if weight is None:
                own.normal_(0.0, getattr(seqcls.config, "initializer_range", 0.02))
            else:
                n = min(rows, weight.shape[0])  # an added pad row keeps zeros
                own[:n] = weight[:n].to(own.dtype)
            lm_head = LMHead(torch.nn.Parameter(own))
    return RewardModel(seqcls, lm_head)
