"""Small data in Dolly's shape, made by the tests themselves.

Records have Dolly's four string fields and its eight categories; a share of
them carry a context, as about a third of the real file does.
"""

from __future__ import annotations

import hashlib
import json
import math
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


# Common English words: tokenizers split text made of them much as they split
# real prose, so token counts (and hence timings) resemble Dolly's.
ENGLISH = (
    "the of and to in is was for that with as on by it from at his an were are which this be or "
    "has had one their not but all new more its first also after two who time they can into other "
    "year city people world state most school part made history government during many water between "
    "known war where three system under life called used used number since area while music team "
    "several found began early american form later much great well national include use such these "
    "river book company war about would work film million family over only high long small"
).split()


def make_dolly_full_size(path: Path, n: int = 15011, seed: int = 0) -> Path:
    """Dolly's size and length profile: about 13 MB, a third with context, long-tailed responses."""
    rng = random.Random(seed)

    def text(median_words: float, sigma: float) -> str:
        n_words = max(1, int(rng.lognormvariate(math.log(median_words), sigma)))
        words = [rng.choice(ENGLISH) for _ in range(n_words)]
        return " ".join(words).capitalize() + "."

    weights = [1766, 2136, 1773, 709, 2191, 1506, 3742, 1188]  # Dolly's category sizes
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            category = rng.choices(CATEGORIES, weights)[0]
            with_context = category in ("closed_qa", "information_extraction", "summarization") or rng.random() < 0.1
            record = {
                "instruction": text(11, 0.5),
                "context": text(130, 0.7) if with_context else "",
                "response": text(45, 0.9),
                "category": category,
            }
            f.write(json.dumps(record) + "\n")
    return path


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
