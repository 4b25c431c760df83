"""The smoke workflow's input (config/smoke.yaml): made-up records in Dolly's shape.

Made by `lorastudy.controls.make_dolly`, so that the file traces back to
code: `python tests/dolly_like.py` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

from lorastudy.controls import make_dolly
from lorastudy.data import sha256_file

SMOKE_DATA = Path(__file__).resolve().parents[1] / ".test" / "dolly_like.jsonl"
SMOKE_RECORDS = 240

if __name__ == "__main__":
    SMOKE_DATA.parent.mkdir(exist_ok=True)
    make_dolly(SMOKE_DATA, n=SMOKE_RECORDS, seed=0)
    print(SMOKE_DATA, sha256_file(SMOKE_DATA), SMOKE_DATA.stat().st_size)
