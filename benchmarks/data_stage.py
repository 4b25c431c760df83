"""Time the data rules (download from an offline copy, filter, split) on a full-size Dolly file.

    python benchmarks/data_stage.py [--dolly databricks-dolly-15k.jsonl]

Without --dolly, a file of Dolly's size and length profile is made (15,011
records, tests/dolly_like.py). The three rules run through Snakemake itself,
as a user runs them. Prints the figures and writes benchmarks/results/data_stage.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dolly_like import make_dolly_full_size  # noqa: E402
from workflow_helpers import snakemake, write_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dolly", type=Path, help="the real databricks-dolly-15k.jsonl, if you have it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dolly = args.dolly or make_dolly_full_size(tmp / "dolly_like_full.jsonl")
        size = dolly.stat().st_size
        config = {
            "dolly": {"sha256": hashlib.sha256(dolly.read_bytes()).hexdigest(), "size_bytes": dolly.stat().st_size},
            "models": {"tiny": {"source": "tiny"}},
            "grid": {"models": ["tiny"], "subsets": ["1k"], "ranks": [4], "epochs": [1]},
        }
        write_config(tmp / "config.yaml", config)
        started = time.perf_counter()
        snakemake(tmp, "results/data/split_counts.csv", "--cores", "2", "--configfile", str(tmp / "config.yaml"),
                  env={"LORASTUDY_DOLLY_JSONL": str(dolly)})
        seconds = time.perf_counter() - started
        counts = (tmp / "results/data/split_counts.csv").read_text().splitlines()[-1]
    result = {
        "input": "real Dolly 15k" if args.dolly else "Dolly-shaped (made up), Dolly's size",
        "input_bytes": size,
        "seconds_download_filter_split": round(seconds, 2),
        "totals (test,val,1k,5k,15k)": counts,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / "data_stage.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
