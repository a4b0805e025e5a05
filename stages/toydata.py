"""A small synthetic instruction task for offline tiny runs (the data behind configs/tiny/).

Deterministic by seed. Each row is a chat `{"messages": [...]}` with one or two user/assistant exchanges;
the answers follow fixed rules a tiny model can learn in a minute on a CPU:

    count from 3 to 6            -> 3 4 5 6
    reverse: red fox sun         -> sun fox red
    repeat moon 3 times          -> moon moon moon
    what comes after 41?         -> 42
    spell cat                    -> c a t

`preference_rows` compares two candidate answers by the gold reward (for the reward model); `prompt_rows` are
questions alone (for PPO and `rlhf eval`).
The held-out questions (`held_out`: 24 of the 120 `repeat` questions) appear in no training file -- not as an SFT
demonstration, a preference pair's question or a PPO prompt -- only among the evaluation prompts
(`eval_prompt_rows`), so an evaluation measures questions no stage trained on. The training files are drawn as
before the split existed, with the rows asking a held-out question dropped (and more drawn in their place).
`gold_reward` is the "human" judge of the toy task (see its docstring); PPO and `rlhf eval` log it next to the
learned reward model's score (`data.gold_reward: toy`), never train on it.
Regenerate the shipped files with `python -m stages.toydata configs/tiny/data`.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

WORDS = (
    "red blue green sun moon star tree fox cat dog bird fish river stone cloud rain snow wind fire leaf "
    "apple bread milk honey salt road door book lamp ship"
).split()


#: counts a `repeat` question asks for
REPEAT_COUNTS = range(2, 6)


def held_out(question: str) -> bool:
    """Whether `question` is one of the evaluation-only questions: `repeat W N times` with
    (index of W in WORDS + N) divisible by 5 -- 24 of the 120 repeat questions, at most one count per word and
    six words per count, so every word and every count also appears in training, only not together."""
    m = re.fullmatch(r"repeat ([a-z]+) (\d+) times", question.strip())
    return bool(m) and m[1] in WORDS and int(m[2]) in REPEAT_COUNTS and (WORDS.index(m[1]) + int(m[2])) % 5 == 0


def _task(rng: random.Random, kinds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> tuple[str, str]:
    """(question, right answer) of a random kind: 0 count, 1 reverse, 2 repeat, 3 successor, 4 spell."""
    kind = rng.choice(kinds)
    if kind == 0:
        a = rng.randint(0, 20)
        b = a + rng.randint(2, 6)
        return f"count from {a} to {b}", " ".join(str(i) for i in range(a, b + 1))
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(2, 5))
        return "reverse: " + " ".join(words), " ".join(reversed(words))
    if kind == 2:
        word, n = rng.choice(WORDS), rng.randint(REPEAT_COUNTS[0], REPEAT_COUNTS[-1])
        return f"repeat {word} {n} times", " ".join([word] * n)
    if kind == 3:
        x = rng.randint(0, 98)
        return f"what comes after {x}?", str(x + 1)
    word = rng.choice(WORDS)
    return f"spell {word}", " ".join(word)


#: share of the shipped demonstrations whose answer is one of the imperfect `candidates` (a human demonstrator's
#: slips): the SFT policy copies them, so there is room for RLHF to improve on it -- as with real SFT data
DEMO_NOISE = 0.3


def sft_rows(n: int, seed: int = 0, multi_turn_share: float = 0.25,
             noise: float = DEMO_NOISE) -> list[dict[str, Any]]:
    """`n` chat rows; about `multi_turn_share` of them have two exchanges, and about `noise` of the answers
    are imperfect (a shorter prefix, one wrong item, the items shuffled, another question's answer)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        messages = []
        for _ in range(2 if rng.random() < multi_turn_share else 1):
            q, a = _task(rng)
            if rng.random() < noise:
                a = rng.choice(candidates(a.split(), rng)[1:] or [a])
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if not any(held_out(m["content"]) for m in messages[::2]):
            rows.append({"messages": messages})
    return rows


def candidates(answer: list[str], rng: random.Random) -> list[str]:
    """Answers an annotator might be shown for a question whose right answer is `answer` (items): the right one,
    its shorter prefixes, one item swapped for another word/number, the items out of order, another question's
    answer. None is longer than the right answer with it as a prefix: annotators never see padded or repeated
    answers -- the reward model's blind spot, as length is for real reward models."""
    n = len(answer)
    out = [" ".join(answer)]
    out += [" ".join(answer[:k]) for k in range(1, n)]
    i = rng.randrange(n)
    swap = str(int(answer[i]) + rng.choice((-2, -1, 1, 2))) if answer[i].isdigit() else rng.choice(
        [w for w in WORDS + list("abcdefghijklmnopqrstuvwxyz") if w != answer[i]])
    out.append(" ".join(answer[:i] + [swap] + answer[i + 1:]))
    shuffled = answer[:]
    rng.shuffle(shuffled)
    out.append(" ".join(shuffled))
    out.append(_task(rng)[1])
    padded = [c for c in out if len(c.split()) > n and c.split()[:n] == answer]  # another answer may extend it
    return [c for c in dict.fromkeys(out) if c not in padded]


def preference_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` chat preference pairs {prompt: [user], chosen: [assistant], rejected: [assistant]}, labelled by
    `gold_reward`: two of `candidates` with different gold values, the higher one chosen. Half the pairs put the
    right answer against another candidate; the rest compare two imperfect ones (a longer prefix of the right
    answer always wins over a shorter one: more of it is there)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        q, a = _task(rng)
        pool = candidates(a.split(), rng)
        first = pool[0] if rng.random() < 0.5 else rng.choice(pool[1:])
        second = rng.choice([c for c in pool if c != first] or [first])
        g1, g2 = gold_reward(q, first), gold_reward(q, second)
        if g1 == g2 or held_out(q):
            continue
        chosen, rejected = (first, second) if g1 > g2 else (second, first)
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return rows


#: the tasks PPO prompts ask: `repeat`, whose answers the tiny reward model judges well (on SFT samples it
#: orders 94 % of differently-gold pairs as the gold judge does, 81 % on the held-out repeat questions; 69 % for
#: spell, 68 % for count: scripts/rm_gold_agreement.py) except in its blind spot, padded answers
#: ("moon moon moon moon" for 3 times) -- the repetition/length exploit
PROMPT_KINDS = (2,)


def questions(n: int, seed: int, kinds: tuple[int, ...], held: bool = False) -> list[str]:
    """`n` questions of the `kinds` tasks drawn by seed (with repetition): training questions, or (held=True)
    only `held_out` ones."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        q = _task(rng, kinds)[0]
        if held_out(q) == held:
            out.append(q)
    return out


def prompt_rows(n: int, seed: int = 2, held: bool = False) -> list[dict[str, Any]]:
    """`n` single-question chat prompts {messages: [user]} of the PROMPT_KINDS tasks: training prompts for PPO,
    or (held=True) drawn from the `held_out` questions only, for validation and `rlhf eval`."""
    return [{"messages": [{"role": "user", "content": q}]} for q in questions(n, seed, PROMPT_KINDS, held)]


def eval_prompt_rows(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """`n` evaluation prompts: the held-out questions, drawn with repetition (24 distinct questions)."""
    return prompt_rows(n, seed, held=True)


#: question pattern -> the right answer's items, for `solve`
_QUESTIONS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"count from (\d+) to (\d+)"), lambda m: [str(i) for i in range(int(m[1]), int(m[2]) + 1)]),
    (re.compile(r"reverse: ((?:[a-z]+ ?)+)"), lambda m: m[1].split()[::-1]),
    (re.compile(r"repeat ([a-z]+) (\d+) times"), lambda m: [m[1]] * int(m[2])),
    (re.compile(r"what comes after (\d+)\?"), lambda m: [str(int(m[1]) + 1)]),
    (re.compile(r"spell ([a-z]+)"), lambda m: list(m[1])),
)


def solve(text: str) -> list[str] | None:
    """The right answer's items for the last toy question in `text` (a prompt in any chat format), or None when
    `text` asks none. `reverse:` reads its words up to the end of the line."""
    best: tuple[int, list[str]] | None = None
    for line_start, line in _lines(text):
        for pattern, answer in _QUESTIONS:
            for m in pattern.finditer(line):
                if best is None or line_start + m.start() >= best[0]:
                    best = (line_start + m.start(), answer(m))
    return None if best is None else best[1]


def _lines(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, line))
        pos += len(line) + 1
    return out


def gold_reward(prompt: str, response: str) -> float:
    """The toy task's "human" judgement of `response` to the last question in `prompt`, in [0, 1]:

        gold = #{i : response_i == answer_i} / max(len(answer), len(response))

    over whitespace-separated items (position by position). The right answer scores 1; every missing, wrong,
    extra or repeated item costs, so padding a right answer ("3 4 5 6 6 6") scores 4/6. A prompt without a
    toy question scores 0.
    """
    answer = solve(prompt)
    items = response.split()
    if not answer or not items:
        return 0.0
    hits = sum(a == r for a, r in zip(answer, items))
    return hits / max(len(answer), len(items))


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


#: file name -> (row maker, rows, seed) of the files in configs/tiny/data
SHIPPED = {
    "sft.jsonl": (sft_rows, 2000, 0),
    "rm.jsonl": (preference_rows, 10000, 1),
    "prompts.jsonl": (prompt_rows, 2000, 2),
    "eval_prompts.jsonl": (eval_prompt_rows, 128, 3),
}


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else Path("configs/tiny/data")
    for name, (make, n, seed) in SHIPPED.items():
        write_jsonl(make(n, seed), target / name)
        print(f"wrote {target / name}")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
