"""Control data: Dolly-shaped records for which the right outcome of a study is known.

- Positive control: each instruction lists four made-up words and asks for
  them in reverse order; the response is that list reversed. It is a
  function of the instruction that a model learns from a few hundred
  examples and that no base model performs unasked, so fine-tuning must
  raise ROUGE-L over the base model, clearly.
- Negative control: the same records with their responses shuffled across
  records. Nothing in an instruction tells its response any more, and the
  responses' words are drawn from so many made-up words that no two share
  much; all a model can learn is the responses' form, which scores nothing.
  A gain here means that the pipeline leaks answers (a test record seen in
  training, scores against the wrong references), not that a model learned.

- Made-up data (`made-up`): Dolly's size, categories, share of records
  with a context and length profile, in common English words that mean
  nothing together. A stand-in of the real file for timing the study and
  trying it offline: its token counts resemble Dolly's, its scores mean
  nothing. `make_dolly` writes small files of the same kind for tests.

Made-up words keep the controls offline and free of anything a pretrained
model knows. Records carry no context and Dolly's eight categories in turn,
so they go through the study's filter and stratified split unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import yaml

from lorastudy.data import DOLLY_RECORDS, sha256_file
from lorastudy.io import atomic_open, write_jsonl

CATEGORIES = (
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
)
# 14 × 5 syllables, two or three to a word: about 350,000 words.
ONSETS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()
WORDS_PER_RECORD = 4
# The controls (a known outcome) and, beside them, made-up data of Dolly's size (no outcome: timing, offline trials).
CONTROLS = ("positive", "negative")
KINDS = (*CONTROLS, "made-up")
WORDS = (
    "river mountain light music garden rain city winter ocean forest engine "
    "paper window bread travel history science language animal planet"
).split()

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


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def positive_control(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` records whose response is the instruction's word list, reversed."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = [made_up_word(rng) for _ in range(WORDS_PER_RECORD)]
        records.append({
            "instruction": f"Write these words in reverse order: {' '.join(words)}",
            "context": "",
            "response": " ".join(reversed(words)),
            "category": CATEGORIES[i % len(CATEGORIES)],
        })
    return records


def negative_control(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The positive control's records, with responses shuffled across records (no response stays put)."""
    records = positive_control(n, seed)
    rng = random.Random(seed + 1)
    # Sattolo's shuffle: a single cycle, so that no record keeps its own response.
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    responses = [r["response"] for r in records]
    return [{**r, "response": responses[order[i]]} for i, r in enumerate(records)]


def write_control(kind: str, path: str | os.PathLike, n: int | None = None, seed: int = 0) -> Path:
    """Write data of `kind` (one of KINDS) as a Dolly JSON Lines file, and its config overlay.

    `n` records (default: 6000 for a control, enough for every default
    subset; Dolly's 15,011 for made-up data). The overlay (`path` with
    `.yaml` for its suffix) names the file as the study's offline copy of
    Dolly, with its own checksum and size, so that `snakemake --configfile
    config/config.yaml <overlay>` runs the study on it (the published Dolly
    checksum would refuse it). Returns the overlay's path.
    """
    if kind not in KINDS:
        raise ValueError(f"control kind must be one of {KINDS}, not {kind!r}")
    path = Path(path).resolve()
    if kind == "made-up":
        make_dolly_full_size(path, n or DOLLY_RECORDS, seed)
    else:
        write_jsonl(path, (positive_control if kind == "positive" else negative_control)(n or 6000, seed))
    overlay = path.with_suffix(".yaml")
    dolly = {"local_copy": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    with atomic_open(overlay) as f:
        f.write(f"# The {kind} data (lorastudy control), as the study's data:\n")
        f.write(f"#   snakemake --cores all --configfile config/config.yaml {overlay.name}\n")
        yaml.safe_dump({"dolly": dolly}, f, sort_keys=False)
    return overlay


def make_dolly_full_size(path: str | os.PathLike, n: int = DOLLY_RECORDS, seed: int = 0) -> Path:
    """Dolly's size and length profile: about 13 MB, a third with context, long-tailed responses."""
    rng = random.Random(seed)

    def text(median_words: float, sigma: float) -> str:
        n_words = max(1, int(rng.lognormvariate(math.log(median_words), sigma)))
        words = [rng.choice(ENGLISH) for _ in range(n_words)]
        return " ".join(words).capitalize() + "."

    weights = [1766, 2136, 1773, 709, 2191, 1506, 3742, 1188]  # Dolly's category sizes
    with atomic_open(path) as f:
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
    return Path(path)


def make_dolly(path: str | os.PathLike, n: int = 400, seed: int = 0, context_share: float = 0.3) -> Path:
    """Write n Dolly-shaped records to `path` (JSON Lines, Dolly's key order)."""
    rng = random.Random(seed)
    # Uneven category sizes, as in the real file, so stratification matters.
    weights = [3, 2, 1, 2, 3, 1, 4, 1]
    with atomic_open(path) as f:
        for _ in range(n):
            category = rng.choices(CATEGORIES, weights)[0]
            f.write(json.dumps(_record(rng, category, rng.random() < context_share)) + "\n")
    return Path(path)


def _record(rng: random.Random, category: str, with_context: bool) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return {
        "instruction": f"What is the {rng.choice(WORDS)} of the {rng.choice(WORDS)}?",
        "context": sentence(rng.randint(8, 20)) if with_context else "",
        "response": sentence(rng.randint(3, 12)),
        "category": category,
    }
