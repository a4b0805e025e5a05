"""The PPO-max tricks as small pure tensor functions (shapes: [B, T] over response tokens unless stated;
`mask` is 1 on real response tokens, 0 on padding). Each docstring states the formula; each function has a
hand-computed test in tests/test_ppo_tricks.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch


# --------------------------------------------------------------------------------------------- masked moments
def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, 0 elsewhere: unlike x * mask, a NaN/inf at a padded position (k3's expm1
    overflowing on a pad token after the stop, say) is dropped, not carried into sums."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked(x, mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * m) / sum(m) (0 when the mask is empty)."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of the masked entries: mean((x - mean)^2)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    mean: float | None = None, var: float | None = None,
) -> torch.Tensor:
    """Advantage normalization: (x - mean) / sqrt(var + eps) over the masked entries (mean kept when
    shift_mean is False); padding stays 0. `mean`/`var` given: those (e.g. over all ranks) instead."""
    if mean is None or var is None:
        mean, var = float(masked_mean(x, mask)), float(masked_var(x, mask))
    out = (x - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return masked(out, mask)


# --------------------------------------------------------------------------------------------- reward transform
@dataclass
class RunningMoments:
    """Mean and population variance of every value seen so far (count n, mean, M2 = sum of squared deviations).

    Two summaries merge exactly (Chan et al.): n = na + nb, d = mb - ma, mean = ma + d nb / n,
    M2 = M2a + M2b + d^2 na nb / n. Ranks merge their batch summaries, so every rank holds the same statistics,
    equal to those of the concatenation of all ranks' values."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count > 0 else 0.0

    @property
    def std(self) -> float:
        return self.var ** 0.5

    @property
    def scale(self) -> float:
        """What the reward transforms divide by: the running std, or 1 while it says nothing about the scores'
        spread (fewer than 2 scores, or all of them equal), where dividing by std + eps would multiply a score
        by up to 1e8."""
        return self.std if self.count >= 2 and self.m2 > 0 else 1.0

    def merge(self, count: float, mean: float, m2: float) -> None:
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of values held by one process (across ranks: experience.merge_across_ranks)."""
        self.merge(*batch_summary(values))


def batch_summary(values: torch.Tensor) -> tuple[float, float, float]:
    """(count, mean, M2) of a batch, in float64."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = float(v.mean())
    return float(n), mean, float(((v - mean) ** 2).sum())


def scale_reward(score: torch.Tensor, moments: RunningMoments, eps: float = 1e-8) -> torch.Tensor:
    """Reward scaling: r / (running std + eps) (std: `RunningMoments.scale`, 1 until the scores spread)."""
    return score / (moments.scale + eps)


def normalize_reward(score: torch.Tensor, moments: RunningMoments, eps: float = 1e-8) -> torch.Tensor:
    """Reward normalization: (r - running mean) / (running std + eps) (std: `RunningMoments.scale`)."""
    return (score - moments.mean) / (moments.scale + eps)


def clip_reward(score: torch.Tensor, delta: float) -> torch.Tensor:
    """Reward clipping to [-delta, delta]."""
    return score.clamp(-delta, delta)


# --------------------------------------------------------------------------------------------- KL and rewards
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log p_ref (per token; unbiased, can be negative)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (ratio - 1) - log ratio with ratio = p_ref / p (per token; unbiased, never negative)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """One-hot of each row's last real token (all zero for an empty row)."""
    width = mask.shape[1]
    last = width - 1 - mask.flip(1).to(torch.int32).argmax(dim=1)
    onehot = torch.zeros_like(mask, dtype=torch.float32)
    rows = torch.arange(mask.shape[0], device=mask.device)
    onehot[rows, last] = 1.0
    return onehot * (mask.sum(dim=1, keepdim=True) > 0)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """R_t = -beta * KL_t on every response token, plus the (transformed) score [B] on the last real token."""
    return masked(-beta * kl + score[:, None] * last_token_mask(mask), mask)


# --------------------------------------------------------------------------------------------- GAE
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns). delta_t = R_t + gamma V_{t+1} - V_t with V = 0 after the last real token;
    A_t = delta_t + gamma lam A_{t+1}; G_t = A_t + V_t. Padding (mask 0) contributes nothing and gets 0.
    Responses are right-padded: real tokens come first."""
    values = masked(values, mask)
    rewards = masked(rewards, mask)
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv = torch.where(m > 0, a, next_adv)
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, masked(adv + values, mask)


# --------------------------------------------------------------------------------------------- losses
def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip: mean over tokens of -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp).
    Returns (loss, clip fraction = share of tokens where the clipped term is the one taken). Padded positions
    are zeroed before the exp: an overflow there would give a NaN gradient even though the loss drops it."""
    logp, old_logp, adv = masked(logp, mask), masked(old_logp, mask), masked(adv, mask)
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2); without c, 0.5 * mean (V - G)^2.
    Returns (loss, clip fraction = share of tokens where the clipped error is the larger). Padded positions are
    zeroed first (a non-finite value there would reach the gradient through the square)."""
    values, old_values, returns = masked(values, mask), masked(old_values, mask), masked(returns, mask)
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=values.device)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(err, err_clipped), mask), masked_mean((err_clipped > err).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position (float32)."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)
