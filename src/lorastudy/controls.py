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

Made-up words keep the controls offline and free of anything a pretrained
model knows. Records carry no context and Dolly's eight categories in turn,
so they go through the study's filter and stratified split unchanged.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import yaml

from lorastudy.data import sha256_file
from lorastudy.io import atomic_open, write_jsonl

CATEGORIES = (
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
)
# 14 × 5 syllables, two or three to a word: about 350,000 words.
ONSETS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()
WORDS_PER_RECORD = 4
KINDS = ("positive", "negative")


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


def write_control(kind: str, path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """Write a control of `kind` ("positive" or "negative") as a Dolly JSON Lines file, and its config overlay.

    The overlay (`path` with `.yaml` for its suffix) names the file as the
    study's offline copy of Dolly, with its own checksum and size, so that
    `snakemake --configfile config/config.yaml <overlay>` runs the study on
    it (the published Dolly checksum would refuse it). Returns the overlay's path.
    """
    if kind not in KINDS:
        raise ValueError(f"control kind must be one of {KINDS}, not {kind!r}")
    make = positive_control if kind == "positive" else negative_control
    path = Path(path).resolve()
    write_jsonl(path, make(n, seed))
    overlay = path.with_suffix(".yaml")
    dolly = {"local_copy": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    with atomic_open(overlay) as f:
        f.write(f"# The {kind} control (lorastudy control), as the study's data:\n")
        f.write(f"#   snakemake --cores all --configfile config/config.yaml {overlay.name}\n")
        yaml.safe_dump({"dolly": dolly}, f, sort_keys=False)
    return overlay
