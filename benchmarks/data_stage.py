"""Time the data rules (download from an offline copy, filter, split) on a full-size Dolly file.

    python -m benchmarks.data_stage [--dolly databricks-dolly-15k.jsonl]

Without --dolly, a file of Dolly's size and length profile is made (15,011
records, `lorastudy control made-up`). The three rules run through Snakemake itself,
as a user runs them. Prints the figures and writes benchmarks/results/data_stage.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lorastudy.controls import make_dolly_full_size

REPO = Path(__file__).resolve().parents[1]


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
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp),
                        "results/data/split_counts.csv", "--cores", "2", "--configfile", str(tmp / "config.yaml")],
                       env={**os.environ, "LORASTUDY_DOLLY_JSONL": str(dolly)}, check=True, capture_output=True)
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
