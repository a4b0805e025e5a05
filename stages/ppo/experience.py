"""From scores and per-token log-probs/values to advantages (PPO-MAX.md steps 3-5), and global statistics.

    raw score s -> reward scaling s / std  or  normalization (s - mean) / std  (running statistics over every
    score seen so far, merged across ranks, this batch included) -> clipping to [-delta, delta]
    R_t = -beta KL_t (+ transformed score on the last response token)     KL_t: k1 or k3 of (logp_old, logp_ref)
    GAE(gamma, lambda) with V = 0 after the last token; returns G = A + V
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.config import PPOAlgoConfig
from stages.distributed import all_reduce_sum
from stages.ppo.tricks import (
    RunningMoments,
    clip_reward,
    gae,
    kl_k1,
    kl_k3,
    masked,
    normalize_reward,
    scale_reward,
    token_rewards,
)


def merge_across_ranks(moments: RunningMoments, values: torch.Tensor, device: torch.device) -> None:
    """Add this rank's `values` and every other rank's to `moments` (the same result on every rank), with two
    all-reduces and one read back to the host: [n, sum x] over all ranks gives the batch's mean m (computed on
    the device), then sum (x - m)^2 over all ranks its exact M2 (no sum x^2 - n m^2 cancellation, which loses
    every digit of the variance once |m| / std nears 1e8 in float64)."""
    v = values.detach().double().flatten().to(device)
    n_sum = all_reduce_sum(torch.stack([v.new_full((), float(v.numel())), v.sum()]), device)
    batch_mean = n_sum[1] / n_sum[0].clamp(min=1.0)
    m2 = all_reduce_sum(((v - batch_mean) ** 2).sum().reshape(1), device)
    count, s, sq = torch.cat([n_sum, m2]).tolist()
    if count > 0:
        moments.merge(count, s / count, sq)


def transform_scores(raw: torch.Tensor, moments: RunningMoments, ppo: PPOAlgoConfig) -> torch.Tensor:
    """Reward scaling or normalization with the running statistics (already updated), then clipping."""
    score = raw.float()
    if ppo.reward_scaling:
        score = scale_reward(score, moments)
    elif ppo.reward_norm:
        score = normalize_reward(score, moments)
    if ppo.reward_clip > 0:
        score = clip_reward(score, ppo.reward_clip)
    return score


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    return kl_k1(logp, ref_logp) if estimator == "k1" else kl_k3(logp, ref_logp)


@dataclass
class Advantages:
    kl: torch.Tensor  # [B, R] the estimator the penalty uses
    rewards: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]


def advantages_for(
    score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
    ppo: PPOAlgoConfig,
) -> Advantages:
    """Token rewards (KL penalty + score on the last token) and GAE."""
    kl = masked(kl_per_token(logp, ref_logp, ppo.kl_estimator), mask)
    rewards = token_rewards(score, kl, mask, ppo.kl_coef)
    adv, ret = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    return Advantages(kl, rewards, adv, ret)


def global_moments(x: torch.Tensor, mask: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(mean, population variance) of the masked entries over all ranks: one all-reduce of
    [n, sum x, sum x^2], one read back to the host."""
    m = mask.double()
    xs = masked(x.detach().double(), m)
    n, s, sq = all_reduce_sum(torch.stack([m.sum(), xs.sum(), (xs * xs).sum()]), device).tolist()
    if n <= 0:
        return 0.0, 0.0
    mean = s / n
    return mean, max(sq / n - mean * mean, 0.0)


class GlobalMeans:
    """Accumulate named (sum, count) pairs on a rank; `reduce` returns sum/count over all ranks, in one
    all-reduce (every rank must call it with the same names in the same order). A tensor added stays on its
    device (summed there, detached, in float64): nothing is read back to the host before `reduce`, which copies
    the Python numbers added over in one copy and reads the totals back in one read, however many values were
    added."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float | torch.Tensor]] = {}

    def add(self, name: str, total: float | torch.Tensor, count: float | torch.Tensor) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + _float64(total)
        entry[1] = entry[1] + _float64(count)

    def reduce(self, device: torch.device) -> dict[str, float]:
        names = list(self.sums)
        flat = [v for name in names for v in self.sums[name]]
        if not flat:
            return {}
        host = torch.tensor([0.0 if torch.is_tensor(v) else v for v in flat], dtype=torch.float64).to(device)
        stacked = torch.stack([v.to(device).reshape(()) if torch.is_tensor(v) else host[i]
                               for i, v in enumerate(flat)])
        total = all_reduce_sum(stacked, device).tolist()
        return {name: total[2 * i] / total[2 * i + 1] if total[2 * i + 1] else 0.0 for i, name in enumerate(names)}


def _float64(x: float | torch.Tensor) -> float | torch.Tensor:
    """A tensor detached in float64 (on its device), anything else a Python float."""
    return x.detach().double() if torch.is_tensor(x) else float(x)
