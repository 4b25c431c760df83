"""Small data in Dolly's shape, made by the tests themselves.

Records have Dolly's four string fields and its eight categories; a share of
them carry a context, as about a third of the real file does.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

CATEGORIES = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
]
WORDS = (
    "river mountain light music garden rain city winter ocean forest engine "
    "paper window bread travel history science language animal planet"
).split()


def record(rng: random.Random, category: str, with_context: bool) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return {
        "instruction": f"What is the {rng.choice(WORDS)} of the {rng.choice(WORDS)}?",
        "context": sentence(rng.randint(8, 20)) if with_context else "",
        "response": sentence(rng.randint(3, 12)),
        "category": category,
    }


def make_dolly(path: Path, n: int = 400, seed: int = 0, context_share: float = 0.3) -> Path:
    """Write n Dolly-shaped records to `path` (JSON Lines, Dolly's key order)."""
    rng = random.Random(seed)
    # Uneven category sizes, as in the real file, so stratification matters.
    weights = [3, 2, 1, 2, 3, 1, 4, 1]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            category = rng.choices(CATEGORIES, weights)[0]
            f.write(json.dumps(record(rng, category, rng.random() < context_share)) + "\n")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The smoke workflow's input (config/smoke.yaml), made by this module so that
# it traces back to code: `python tests/dolly_like.py` rewrites it.
SMOKE_DATA = Path(__file__).resolve().parents[1] / ".test" / "dolly_like.jsonl"
SMOKE_RECORDS = 240

if __name__ == "__main__":
    SMOKE_DATA.parent.mkdir(exist_ok=True)
    make_dolly(SMOKE_DATA, n=SMOKE_RECORDS, seed=0)
    print(SMOKE_DATA, sha256(SMOKE_DATA), SMOKE_DATA.stat().st_size)
