"""Gold ("human") rewards: known judges of a synthetic task, logged next to the learned reward model's score to
show over-optimisation (PPO's objective/gold and eval/gold, `rlhf eval`). They are never trained on."""

from __future__ import annotations

from typing import Any, Callable

from stages import toydata

#: name (config `data.gold_reward`) -> judge(prompt text, response text) -> float
GOLD_REWARDS: dict[str, Callable[[str, str], float]] = {"toy": toydata.gold_reward}
#: name -> whether a prompt text asks a question the judge knows (a prompt that does not scores 0)
GOLD_QUESTIONS: dict[str, Callable[[str], bool]] = {"toy": lambda text: toydata.solve(text) is not None}


def check_gold_prompts(name: str, tokenizer: Any, prompts: list[list[int]], where: str,
                       warn: Callable[[str], None]) -> None:
    """A gold judge on prompts it cannot judge logs 0 for them, which reads as a policy that fails the task:
    ConfigError when no prompt asks one of its questions, a warning naming the count when some do not."""
    from stages.errors import ConfigError

    asks = GOLD_QUESTIONS[name]
    missing = sum(not asks(tokenizer.decode(p, skip_special_tokens=True)) for p in prompts)
    if prompts and missing == len(prompts):
        raise ConfigError(f"data.gold_reward: {name!r} judges its own task's questions and none of the "
                          f"{len(prompts)} prompts of {where} asks one (drop data.gold_reward for other data)")
    if missing:
        warn(f"warning: data.gold_reward {name!r}: {missing} of the {len(prompts)} prompts of {where} ask no "
             "question it judges; their gold reward is 0")


def gold_scores(name: str, tokenizer: Any, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    """The judge `name` on decoded (prompt, response) token lists; special tokens are dropped from both."""
    judge = GOLD_REWARDS[name]
    return [judge(tokenizer.decode(p, skip_special_tokens=True), tokenizer.decode(r, skip_special_tokens=True))
            for p, r in zip(prompts, responses)]


def gold_agreement(groups: list[list[tuple[float, float]]]) -> tuple[float, int]:
    """How often a reward model orders two responses to one prompt as the gold judge does.

    `groups` holds, per prompt, the (RM reward, gold reward) of its responses. Over every pair of one prompt's
    responses whose gold rewards differ: agreement = (pairs the RM orders as gold + RM ties / 2) / pairs.
    Returns (agreement, pairs); (nan, 0) when no pair's gold differs.

    >>> gold_agreement([[(2.0, 1.0), (1.0, 0.5), (1.0, 1.0)], [(0.0, 0.2), (1.0, 0.4), (2.0, 0.1)]])
    (0.5, 5)
    """
    agree, pairs = 0.0, 0
    for group in groups:
        for i, (r1, g1) in enumerate(group):
            for r2, g2 in group[i + 1:]:
                if g1 != g2:
                    pairs += 1
                    agree += 0.5 if r1 == r2 else float((r1 > r2) == (g1 > g2))
    return (agree / pairs if pairs else float("nan")), pairs
