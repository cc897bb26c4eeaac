"""Rule rewards for RL: plain functions `(completion, answer) -> float`, combined by a spec string.

Add your own: write `def my_reward(completion: str, answer: str | None) -> float` and put it in REWARDS.
A spec such as "numeric,format_boxed:0.5,repetition:0.2" sums the named rewards with their weights (default 1):

    reward = parse_reward_spec("numeric,format_boxed:0.5")
    reward("so the answer is \\boxed{42}", "42")  # 1.0 + 0.5 * 1.0
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

Reward = Callable[[str, "str | None"], float]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}\s*\.?\s*$")


def _norm(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def exact(completion: str, answer: str | None) -> float:
    """1.0 when the completion equals the answer up to case and whitespace, else 0.0."""
    return float(answer is not None and _norm(completion) == _norm(answer))


def last_number(text: str) -> float | None:
    """The last number written in text ("1,234.5" -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric(completion: str, answer: str | None) -> float:
    """1.0 when the last number in the completion equals the answer's number (to 1e-6), else 0.0."""
    want = None if answer is None else last_number(answer)
    got = last_number(completion)
    return float(want is not None and got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def format_boxed(completion: str, answer: str | None = None) -> float:
    """1.0 when the completion ends with a non-empty \\boxed{...} answer (an optional final period allowed)."""
    m = _BOXED.search(completion)
    return float(m is not None and m.group(1).strip() != "")


def format_json(completion: str, answer: str | None = None) -> float:
    """1.0 when the whole completion (surrounding whitespace aside) parses as JSON, else 0.0."""
    try:
        json.loads(completion)
    except ValueError:
        return 0.0
    return 1.0


def length_penalty(completion: str, answer: str | None = None, max_chars: int = 512) -> float:
    """-(characters beyond max_chars) / max_chars: 0 for short completions, -1 at twice max_chars."""
    return -max(0, len(completion) - max_chars) / max_chars


def repetition(completion: str, answer: str | None = None, n: int = 3) -> float:
    """-(fraction of the completion's word n-grams that repeat an earlier one): 0 with no repeats."""
    words = completion.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return -(len(grams) - len(set(grams))) / len(grams)


REWARDS: dict[str, Reward] = {
    "exact": exact,
    "numeric": numeric,
    "format_boxed": format_boxed,
    "format_json": format_json,
    "length": length_penalty,
    "repetition": repetition,
}


def parse_reward_spec(spec: str) -> Reward:
    """ "name[:weight],..." -> one reward function returning the weighted sum of the named rewards."""
    parts: list[tuple[Reward, float]] = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight in {item.strip()!r} is not a number") from None
        parts.append((REWARDS[name], w))

    def combined(completion: str, answer: str | None) -> float:
        return sum(w * fn(completion, answer) for fn, w in parts)

    return combined
