"""The data stage: download Dolly 15k, validate and filter it, cut the splits.

raw (checksum-pinned) -> filtered (every line validated) -> test / val / nested
training subsets. Every record carries `id`, its 1-based line number in the
raw file, so any generation or score traces back to its source line.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy.io import atomic_open, atomic_path, write_jsonl
from lorastudy.prompts import DEFAULT_CONTEXT_TEMPLATE, fold_context

log = logging.getLogger(__name__)

DOLLY_FIELDS = ("instruction", "context", "response", "category")
# The checksum of databricks-dolly-15k.jsonl as Databricks publishes it (the
# schema's default for dolly.sha256): a report on any other file says so.
PUBLISHED_DOLLY_SHA256 = "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec"

# An offline copy named here overrides `dolly.local_copy` in the config.
LOCAL_COPY_ENV = "LORASTUDY_DOLLY_JSONL"
ALL = "all"
# Records in the published file (all of them, context or not).
DOLLY_RECORDS = 15011


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the line."""


# --------------------------------------------------------------------------
# download_dolly
# --------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_local_copy(configured: str | None) -> str | None:
    """The offline copy to use: the environment variable wins over the config."""
    return os.environ.get(LOCAL_COPY_ENV) or configured or None


def _verify(path: Path, source: str, sha256: str, size_bytes: int | None) -> None:
    size = path.stat().st_size
    if size_bytes is not None and size != size_bytes:
        raise DataError(
            f"{source}: expected {size_bytes:,} bytes, got {size:,} (truncated or a different file)"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise DataError(f"{source}: sha256 mismatch: expected {sha256}, actual {actual}")


# Transient failures worth another try; an HTTP 4xx other than 408/429 is not.
_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _retryable(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    return isinstance(error, _RETRYABLE)


def _download_once(url: str, dest: Path, timeout_s: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
        got = out.tell()
    if expected is not None and got != int(expected):
        raise http.client.IncompleteRead(b"", int(expected) - got)


OFFLINE_HINT = (
    "Without internet, give a copy of databricks-dolly-15k.jsonl (sha256 checked as usual): "
    "LORASTUDY_DOLLY_JSONL=/path/to/databricks-dolly-15k.jsonl snakemake ..., "
    "or dolly.local_copy: /path/to/databricks-dolly-15k.jsonl in the config"
)


def fetch_dolly(
    dest: str | os.PathLike,
    url: str,
    sha256: str,
    size_bytes: int | None = None,
    local_copy: str | None = None,
    retries: int = 4,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Put the pinned Dolly JSONL at `dest`, from an offline copy or by download.

    The offline copy is the environment variable LORASTUDY_DOLLY_JSONL if set,
    else `local_copy`; with neither, the file is downloaded from `url`.

    The checksum (and size, when given) is verified either way; `dest`
    appears only once the file is complete and verified. Network errors are
    retried `retries` times with exponential back-off.
    """
    dest = Path(dest)
    local_copy = resolve_local_copy(local_copy)
    with atomic_path(dest) as tmp:
        if local_copy:
            source = str(local_copy)
            if not Path(local_copy).is_file():
                raise DataError(f"offline Dolly copy {local_copy} does not exist")
            log.info("copying offline Dolly copy %s", local_copy)
            shutil.copyfile(local_copy, tmp)
        else:
            source = url
            for attempt in range(retries + 1):
                try:
                    log.info("downloading %s (attempt %d of %d)", url, attempt + 1, retries + 1)
                    _download_once(url, tmp, timeout_s)
                    break
                except Exception as error:
                    if not _retryable(error) or attempt == retries:
                        # The hint is the message's end, so that it is the last line of the job's log.
                        raise DataError(
                            f"{url}: download failed after {attempt + 1} attempt(s): {error!r}. {OFFLINE_HINT}"
                        ) from error
                    wait = backoff_s * 2**attempt
                    log.warning("download failed (%r); retrying in %.0f s", error, wait)
                    sleep(wait)
        _verify(tmp, source, sha256, size_bytes)
    log.info("verified %s (sha256 %s)", dest, sha256)
    return dest


# --------------------------------------------------------------------------
# filter_context
# --------------------------------------------------------------------------


def read_dolly(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield validated Dolly records, each with `id` = its line number.

    Raises DataError naming the file and line for anything that is not a
    JSON object whose four Dolly fields are strings, for bytes that are not
    UTF-8, and for an empty file.
    """
    path = Path(path)
    n = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in DOLLY_FIELDS:
                if key not in obj:
                    raise DataError(f"{where}: missing field '{key}'")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
            n += 1
            yield {"id": line_no, **{key: obj[key] for key in DOLLY_FIELDS}}
    if n == 0:
        raise DataError(f"{path}: no records (the file is empty)")


def filter_context(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    mode: str = "drop",
    context_template: str = DEFAULT_CONTEXT_TEMPLATE,
) -> dict[str, int]:
    """Write the records of `src` that the study uses to `dest`.

    `drop` removes every record with a non-empty context, as the KerasHub
    Gemma LoRA tutorial does; `include` keeps them and folds the context into
    the instruction. Records whose instruction or response is blank are
    dropped in both modes (nothing to learn or to score), and counted.
    Returns the counts, which are also logged.
    """
    if mode not in ("drop", "include"):
        raise ValueError(f"data.context must be 'drop' or 'include', got {mode!r}")
    counts = Counter()

    def kept() -> Iterator[dict[str, Any]]:
        for record in read_dolly(src):
            counts["read"] += 1
            has_context = bool(record["context"].strip())
            counts["with_context"] += has_context
            if mode == "drop" and has_context:
                continue
            if not record["instruction"].strip() or not record["response"].strip():
                counts["blank"] += 1
                log.warning("%s, line %d: blank instruction or response; dropped", src, record["id"])
                continue
            if mode == "include":
                record["instruction"] = fold_context(record["instruction"], record["context"], context_template)
                record["context"] = ""
            yield record

    counts["written"] = write_jsonl(dest, kept())
    log.info(
        "%s: %d records read, %d with context, %d blank, %d written (mode %s)",
        src, counts["read"], counts["with_context"], counts["blank"], counts["written"], mode,
    )
    return dict(counts)


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------


def _quotas(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """Split n across categories in proportion to counts (largest remainder)."""
    total = sum(counts.values())
    exact = {c: n * k / total for c, k in counts.items()}
    quotas = {c: int(x) for c, x in exact.items()}
    # Ties in the remainder go to the category that sorts first, so the
    # allocation depends on the data alone.
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: n - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def stratified_split(
    records: list[dict[str, Any]], n: int, rng: np.random.Generator, key: str = "category"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw n records stratified by `key`; return (drawn, rest), each in input order."""
    if not 0 < n < len(records):
        raise DataError(f"cannot draw {n} records from a pool of {len(records)}")
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record[key], []).append(i)
    quotas = _quotas({c: len(ix) for c, ix in groups.items()}, n)
    drawn = set()
    for c in sorted(groups):
        drawn.update(rng.choice(groups[c], size=quotas[c], replace=False).tolist())
    return (
        [r for i, r in enumerate(records) if i in drawn],
        [r for i, r in enumerate(records) if i not in drawn],
    )


def subset_sizes(subsets: Mapping[str, int | str], pool: int) -> dict[str, int]:
    """Resolve configured subset sizes against the training pool ('all' = every record)."""
    sizes = {}
    for name, size in subsets.items():
        if size == ALL:
            sizes[name] = pool
        elif isinstance(size, int) and 0 < size <= pool:
            sizes[name] = size
        else:
            raise DataError(
                f"data.subsets.{name}: {size!r} records asked for, but the training pool "
                f"after the test and validation splits holds {pool}"
            )
    return sizes


def normalise(text: str) -> str:
    """Case and runs of whitespace ignored: how an exact duplicate is recognised."""
    return " ".join(text.casefold().split())


def duplicate_groups(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by normalised instruction, context and response, in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        key = tuple(normalise(record[field]) for field in ("instruction", "context", "response"))
        groups.setdefault(key, []).append(record)
    return list(groups.values())


def split_dolly(
    filtered: str | os.PathLike,
    test_path: str | os.PathLike,
    val_path: str | os.PathLike,
    train_paths: Mapping[str, str | os.PathLike],
    counts_path: str | os.PathLike,
    duplicates_path: str | os.PathLike,
    subsets: Mapping[str, int | str],
    test_size: int = 500,
    val_size: int = 200,
    seed: int = 0,
) -> dict[str, int]:
    """Cut the held-out test split, the validation split, then nested subsets.

    Exact duplicates (`duplicate_groups`) are drawn as one: the test and
    validation splits take one record of each drawn group and its copies are
    dropped, so no text is both trained on and held out. The held-out splits
    are drawn (stratified by category) before any subset. Subsets are
    prefixes of one seeded permutation of the remaining pool, hence nested
    (1k ⊂ 5k ⊂ 15k). Every group of two or more records is listed in
    `duplicates_path` with the split it went to. Returns the size of every
    output.
    """
    records = list(read_dolly_filtered(filtered))
    groups = duplicate_groups(records)
    rng = np.random.default_rng(seed)
    if test_size + val_size >= len(groups):
        raise DataError(
            f"{filtered}: data.test_size ({test_size}) + data.val_size ({val_size}) must leave "
            f"training records, but only {len(groups)} distinct records passed the filter"
        )
    test, rest = stratified_split([g[0] for g in groups], test_size, rng)
    val, pool_firsts = stratified_split(rest, val_size, rng)
    in_pool = {r["id"] for r in pool_firsts}
    pool = [r for g in groups if g[0]["id"] in in_pool for r in g]
    pool.sort(key=lambda r: r["id"])
    sizes = subset_sizes(subsets, len(pool))
    if set(train_paths) != set(sizes):
        raise ValueError(f"train_paths {sorted(train_paths)} do not match data.subsets {sorted(sizes)}")
    order = rng.permutation(len(pool))
    splits = {"test": test, "val": val}
    for name in sorted(sizes, key=sizes.get):
        chosen = set(order[: sizes[name]].tolist())
        splits[f"train_{name}"] = [r for i, r in enumerate(pool) if i in chosen]

    write_jsonl(test_path, test)
    write_jsonl(val_path, val)
    for name, path in train_paths.items():
        write_jsonl(path, splits[f"train_{name}"])
    write_split_counts(counts_path, splits)
    write_duplicate_groups(duplicates_path, groups, {r["id"]: "test" for r in test} | {r["id"]: "val" for r in val})
    sizes = {split: len(rs) for split, rs in splits.items()}
    log.info("split sizes: %s", sizes)
    return sizes


def write_duplicate_groups(
    path: str | os.PathLike, groups: list[list[dict[str, Any]]], held_out: Mapping[int, str]
) -> None:
    """A CSV of every group of exact duplicates: its records' ids and where it went."""
    copies = [g for g in groups if len(g) > 1]
    dropped = [0 if g[0]["id"] not in held_out else len(g) - 1 for g in copies]
    with atomic_open(path) as f:
        f.write("group,ids,records,split,copies_dropped\n")
        for n, (g, d) in enumerate(zip(copies, dropped), 1):
            f.write(f"{n},{' '.join(str(r['id']) for r in g)},{len(g)},{held_out.get(g[0]['id'], 'train')},{d}\n")
    log.info(
        "%d groups of exact duplicates hold %d records; %d copies of held-out records dropped from training",
        len(copies), sum(len(g) for g in copies), sum(dropped),
    )


def read_dolly_filtered(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Read the filter stage's output, which keeps the `id` of the raw file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_split_counts(path: str | os.PathLike, splits: Mapping[str, list[dict[str, Any]]]) -> None:
    """A CSV of records per category (rows) per split (columns), with totals."""
    per_split = {name: Counter(r["category"] for r in rs) for name, rs in splits.items()}
    categories = sorted(set().union(*per_split.values()))
    with atomic_open(path) as f:
        f.write(",".join(["category", *splits]) + "\n")
        for c in categories:
            f.write(",".join([c, *(str(n[c]) for n in per_split.values())]) + "\n")
        f.write(",".join(["total", *(str(n.total()) for n in per_split.values())]) + "\n")
