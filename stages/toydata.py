"""A small synthetic instruction task for offline tiny runs (the data behind configs/tiny/).

Deterministic by seed. Each row is a chat `{"messages": [...]}` with one or two user/assistant exchanges;
the answers follow fixed rules a tiny model can learn in a minute on a CPU:

    count from 3 to 6            -> 3 4 5 6
    reverse: red fox sun         -> sun fox red
    repeat moon 3 times          -> moon moon moon
    what comes after 41?         -> 42
    spell cat                    -> c a t

`preference_rows` pairs each right answer with a corrupted one (for the reward model).
Regenerate the shipped files with `python -m stages.toydata configs/tiny/data`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

WORDS = (
    "red blue green sun moon star tree fox cat dog bird fish river stone cloud rain snow wind fire leaf "
    "apple bread milk honey salt road door book lamp ship"
).split()


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a = rng.randint(0, 20)
        b = a + rng.randint(2, 6)
        return f"count from {a} to {b}", " ".join(str(i) for i in range(a, b + 1))
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(2, 5))
        return "reverse: " + " ".join(words), " ".join(reversed(words))
    if kind == 2:
        word, n = rng.choice(WORDS), rng.randint(2, 5)
        return f"repeat {word} {n} times", " ".join([word] * n)
    if kind == 3:
        x = rng.randint(0, 98)
        return f"what comes after {x}?", str(x + 1)
    word = rng.choice(WORDS)
    return f"spell {word}", " ".join(word)


def sft_rows(n: int, seed: int = 0, multi_turn_share: float = 0.25) -> list[dict[str, Any]]:
    """`n` chat rows; about `multi_turn_share` of them have two exchanges."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(2 if rng.random() < multi_turn_share else 1):
            q, a = _task(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer to the same question: another task's answer, the answer said twice, the answer with its
    last item dropped (or one more item), or its items out of order (a single item: a different one)."""
    items = answer.split()
    kind = rng.randrange(4)
    if kind == 0:
        while True:
            other = _task(rng)[1]
            if other != answer:
                return other
    if kind == 1:
        return answer + " " + answer
    if kind == 2:
        return " ".join(items[:-1]) if len(items) > 1 else answer + " " + rng.choice(WORDS)
    shuffled = items[:]
    while len(set(items)) > 1 and shuffled == items:
        rng.shuffle(shuffled)
    if shuffled != items:
        return " ".join(shuffled)
    return " ".join([rng.choice([w for w in WORDS if w != items[0]])] + items[1:])


def preference_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` chat preference pairs {prompt: [user], chosen: [assistant: right answer], rejected: [assistant: a
    corrupted answer]} for the same tasks as `sft_rows`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _task(rng)
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": corrupt(a, rng)}],
        })
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


#: file name -> (row maker, rows, seed) of the files in configs/tiny/data
SHIPPED = {"sft.jsonl": (sft_rows, 2000, 0), "rm.jsonl": (preference_rows, 2000, 1)}


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else Path("configs/tiny/data")
    for name, (make, n, seed) in SHIPPED.items():
        write_jsonl(make(n, seed), target / name)
        print(f"wrote {target / name}")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
