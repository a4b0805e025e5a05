"""Pattern-collapse monitor (PPO-MAX.md "What to monitor"): a policy that cheats the reward model gets longer,
more repetitive responses that hit the length cap, and drifts away from the reference. Each check compares one
iteration's global metric with its threshold (0 = that check off)."""

from __future__ import annotations

from stages.config import MonitorConfig


#: the per-token KL metric the check reads, per monitor.kl_estimator
KL_METRICS = {"k1": "objective/kl_per_token", "k3": "objective/kl_k3_per_token"}


def collapse_reasons(metrics: dict[str, float], start_length: float | None, cfg: MonitorConfig,
                     cap_forced: bool = False) -> list[str]:
    """Why the monitor fires for this iteration's metrics ([] = quiet). `start_length` is the mean response
    length of the first iteration. `cap_forced`: no response can stop before max_new_tokens
    (generation.min_new_tokens >= max_new_tokens, as `rlhf bench`'s workloads sample), so every one hits it and
    the cap-share check says nothing: it is not made."""
    reasons = []
    cap = metrics["rollout/cap_share"]
    if cfg.max_cap_share > 0 and not cap_forced and cap > cfg.max_cap_share:
        reasons.append(f"{cap:.0%} of responses hit max_new_tokens (> {cfg.max_cap_share:.0%})")
    length = metrics["rollout/response_length"]
    if cfg.max_length_ratio > 0 and start_length and length > cfg.max_length_ratio * start_length:
        reasons.append(f"mean length {length:.1f} > {cfg.max_length_ratio:g} x its start {start_length:.1f}")
    kl = metrics[KL_METRICS[cfg.kl_estimator]]
    if cfg.max_kl > 0 and kl > cfg.max_kl:
        reasons.append(f"KL to the reference {kl:.4f}/token ({cfg.kl_estimator}) > {cfg.max_kl:g}")
    rep = metrics["rollout/repetition"]
    if cfg.max_repetition > 0 and rep > cfg.max_repetition:
        reasons.append(f"{cfg.ngram}-gram repetition {rep:.2f} > {cfg.max_repetition:g}")
    return reasons
