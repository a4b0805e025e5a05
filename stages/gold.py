"""Gold ("human") rewards: known judges of a synthetic task, logged next to the learned reward model's score to
show over-optimisation (PPO's objective/gold and eval/gold, `rlhf eval`). They are never trained on."""

from __future__ import annotations

from typing import Any, Callable

from stages import toydata

#: name (config `data.gold_reward`) -> judge(prompt text, response text) -> float
GOLD_REWARDS: dict[str, Callable[[str, str], float]] = {"toy": toydata.gold_reward}


def gold_scores(name: str, tokenizer: Any, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    """The judge `name` on decoded (prompt, response) token lists; special tokens are dropped from both."""
    judge = GOLD_REWARDS[name]
    return [judge(tokenizer.decode(p, skip_special_tokens=True), tokenizer.decode(r, skip_special_tokens=True))
            for p, r in zip(prompts, responses)]
