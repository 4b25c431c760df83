"""The data stage: download, validation, filtering, splits."""

from __future__ import annotations

import csv
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from lorastudy.controls import CATEGORIES, make_dolly
from lorastudy.data import sha256_file as sha256

from lorastudy import data
from lorastudy.data import DataError
from lorastudy.io import read_jsonl

# --------------------------------------------------------------------------
# download_dolly
# --------------------------------------------------------------------------


class _Server:
    """A real HTTP server on localhost that plays back scripted answers."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                status, body, length = server.answers.pop(0) if len(server.answers) > 1 else server.answers[0]
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/databricks-dolly-15k.jsonl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*answers):
        servers.append(_Server(answers))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _no_sleep(seconds):
    pass


def test_download_verifies_and_renames(serve, dolly_file, tmp_path):
    body = dolly_file.read_bytes()
    server = serve((200, body, None))
    dest = tmp_path / "raw" / "dolly.jsonl"
    data.fetch_dolly(dest, server.url, sha256(dolly_file), len(body))
    assert dest.read_bytes() == body
    assert list(dest.parent.iterdir()) == [dest]


def test_download_retries_transient_errors_with_backoff(serve, dolly_file, tmp_path):
    body = dolly_file.read_bytes()
    server = serve((503, b"busy", None), (503, b"busy", None), (200, body, None))
    waits = []
    dest = tmp_path / "dolly.jsonl"
    data.fetch_dolly(dest, server.url, sha256(dolly_file), sleep=waits.append, backoff_s=1.0)
    assert server.requests == 3
    assert waits == [1.0, 2.0]
    assert dest.read_bytes() == body


def test_download_does_not_retry_not_found(serve, tmp_path):
    server = serve((404, b"no", None))
    with pytest.raises(DataError, match="404"):
        data.fetch_dolly(tmp_path / "d.jsonl", server.url, "0" * 64, sleep=_no_sleep)
    assert server.requests == 1


def test_a_failed_download_ends_by_saying_how_to_give_an_offline_copy(tmp_path):
    # Nothing listens on port 9 of the loopback: the connection is refused at once.
    with pytest.raises(DataError) as error:
        data.fetch_dolly(tmp_path / "d.jsonl", "http://127.0.0.1:9/databricks-dolly-15k.jsonl", "0" * 64, retries=1, sleep=_no_sleep)
    message = str(error.value)
    assert "download failed after 2 attempt(s)" in message
    assert message.endswith(data.OFFLINE_HINT) and "LORASTUDY_DOLLY_JSONL" in message and "dolly.local_copy" in message


def test_truncated_download_fails_and_leaves_nothing(serve, dolly_file, tmp_path):
    body = dolly_file.read_bytes()
    # The server promises the whole file and closes after half of it.
    server = serve((200, body[: len(body) // 2], len(body)))
    with pytest.raises(DataError, match="IncompleteRead"):
        data.fetch_dolly(tmp_path / "d.jsonl", server.url, sha256(dolly_file), retries=2, sleep=_no_sleep)
    assert server.requests == 3
    assert list(tmp_path.glob("d.jsonl*")) == [] and list(tmp_path.glob(".d.jsonl*")) == []


def test_checksum_mismatch_names_expected_and_actual(dolly_file, tmp_path):
    wrong = "f" * 64
    with pytest.raises(DataError) as error:
        data.fetch_dolly(tmp_path / "d.jsonl", "http://unused", wrong, local_copy=str(dolly_file))
    assert f"expected {wrong}" in str(error.value)
    assert f"actual {sha256(dolly_file)}" in str(error.value)
    assert not (tmp_path / "d.jsonl").exists()


def test_size_mismatch_is_reported_as_truncation(dolly_file, tmp_path):
    size = dolly_file.stat().st_size
    with pytest.raises(DataError, match=f"expected {size + 1:,} bytes, got {size:,}"):
        data.fetch_dolly(tmp_path / "d.jsonl", "http://unused", sha256(dolly_file), size + 1, str(dolly_file))


def test_environment_variable_overrides_configured_copy(monkeypatch, dolly_file, tmp_path):
    monkeypatch.setenv(data.LOCAL_COPY_ENV, str(dolly_file))
    dest = data.fetch_dolly(tmp_path / "d.jsonl", "http://unused", sha256(dolly_file), local_copy="/nowhere")
    assert dest.read_bytes() == dolly_file.read_bytes()


def test_missing_local_copy_is_named(tmp_path):
    with pytest.raises(DataError, match="/nowhere/dolly.jsonl does not exist"):
        data.fetch_dolly(tmp_path / "d.jsonl", "http://unused", "0" * 64, local_copy="/nowhere/dolly.jsonl")


# --------------------------------------------------------------------------
# validation and filter_context
# --------------------------------------------------------------------------

GOOD = json.dumps({"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b"{not json", "line 2: not valid JSON"),
        (b"[1, 2]", "line 2: expected a JSON object, got list"),
        (json.dumps({"instruction": "x", "context": "", "category": "open_qa"}).encode(), "line 2: missing field 'response'"),
        (
            json.dumps({"instruction": "x", "context": None, "response": "y", "category": "open_qa"}).encode(),
            "line 2: field 'context' must be a string, got NoneType",
        ),
        (b'{"instruction": "caf\xe9"}', "line 2: not valid UTF-8"),
    ],
)
def test_bad_line_names_file_and_line_and_leaves_no_output(tmp_path, bad_line, message):
    src = tmp_path / "raw.jsonl"
    src.write_bytes(GOOD.encode() + b"\n" + bad_line + b"\n" + GOOD.encode() + b"\n")
    dest = tmp_path / "filtered.jsonl"
    with pytest.raises(DataError) as error:
        data.filter_context(src, dest)
    assert str(error.value).startswith(f"{src}, {message}")
    assert list(tmp_path.iterdir()) == [src]


def test_empty_file_is_an_error(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_bytes(b"")
    with pytest.raises(DataError, match="no records"):
        data.filter_context(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_drop_mode_removes_records_with_context(dolly_file, tmp_path):
    raw = [json.loads(line) for line in dolly_file.read_text().splitlines()]
    counts = data.filter_context(dolly_file, tmp_path / "f.jsonl", mode="drop")
    kept = read_jsonl(tmp_path / "f.jsonl")
    expected_ids = [i for i, r in enumerate(raw, start=1) if not r["context"]]
    assert [r["id"] for r in kept] == expected_ids
    assert counts["read"] == len(raw) and counts["written"] == len(expected_ids)
    assert counts["with_context"] == len(raw) - len(expected_ids)
    # Each kept record is its raw line, plus the line number as id.
    for r in kept:
        assert {k: v for k, v in r.items() if k != "id"} == raw[r["id"] - 1]


def test_include_mode_folds_context_into_the_instruction(dolly_file, tmp_path):
    raw = [json.loads(line) for line in dolly_file.read_text().splitlines()]
    data.filter_context(dolly_file, tmp_path / "f.jsonl", mode="include", context_template="{instruction} || {context}")
    kept = read_jsonl(tmp_path / "f.jsonl")
    assert len(kept) == len(raw)
    for r in kept:
        source = raw[r["id"] - 1]
        expected = f"{source['instruction']} || {source['context']}" if source["context"] else source["instruction"]
        assert r["instruction"] == expected and r["context"] == ""


def test_blank_instructions_and_responses_are_dropped_and_counted(tmp_path, caplog):
    blank = json.dumps({"instruction": "  ", "context": "", "response": "y", "category": "open_qa"})
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join([GOOD, blank, GOOD]) + "\n")
    counts = data.filter_context(src, tmp_path / "f.jsonl")
    assert counts["blank"] == 1 and counts["written"] == 2
    assert f"{src}, line 2: blank instruction or response" in caplog.text


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------


def _split(tmp_path, filtered, seed=7, subsets=None, test_size=60, val_size=20, out="out"):
    subsets = subsets or {"1k": 100, "5k": 200, "15k": "all"}
    out = tmp_path / out
    sizes = data.split_dolly(
        filtered,
        test_path=out / "test.jsonl",
        val_path=out / "val.jsonl",
        train_paths={s: out / f"train_{s}.jsonl" for s in subsets},
        counts_path=out / "split_counts.csv",
        duplicates_path=out / "duplicate_groups.csv",
        subsets=subsets,
        test_size=test_size,
        val_size=val_size,
        seed=seed,
    )
    return out, sizes


@pytest.fixture
def filtered(tmp_path):
    raw = make_dolly(tmp_path / "raw.jsonl", n=700, seed=3)
    data.filter_context(raw, tmp_path / "filtered.jsonl")
    return tmp_path / "filtered.jsonl"


def test_split_sizes_disjointness_and_nesting(tmp_path, filtered):
    n = len(read_jsonl(filtered))
    out, sizes = _split(tmp_path, filtered)
    ids = {name: [r["id"] for r in read_jsonl(out / f"{name}.jsonl")] for name in sizes}
    assert sizes == {"test": 60, "val": 20, "train_1k": 100, "train_5k": 200, "train_15k": n - 80}
    assert {k: len(v) for k, v in ids.items()} == sizes
    held_out = set(ids["test"]) | set(ids["val"])
    assert not set(ids["test"]) & set(ids["val"])
    for name in ("train_1k", "train_5k", "train_15k"):
        assert not set(ids[name]) & held_out
        assert len(set(ids[name])) == len(ids[name])
    assert set(ids["train_1k"]) < set(ids["train_5k"]) < set(ids["train_15k"])
    assert set(ids["train_15k"]) | held_out == {r["id"] for r in read_jsonl(filtered)}


def test_test_split_is_stratified_by_category(tmp_path, filtered):
    records = read_jsonl(filtered)
    out, _ = _split(tmp_path, filtered)
    test = Counter(r["category"] for r in read_jsonl(out / "test.jsonl"))
    pool = Counter(r["category"] for r in records)
    for c in pool:
        assert abs(test[c] - 60 * pool[c] / len(records)) < 1
    assert set(test) == set(CATEGORIES)


def test_split_counts_csv(tmp_path, filtered):
    out, sizes = _split(tmp_path, filtered)
    rows = list(csv.DictReader(open(out / "split_counts.csv")))
    assert [r["category"] for r in rows] == sorted(CATEGORIES) + ["total"]
    assert {k: int(v) for k, v in rows[-1].items() if k != "category"} == sizes
    for split in sizes:
        assert sum(int(r[split]) for r in rows[:-1]) == sizes[split]


def test_split_is_byte_identical_on_rerun_and_changes_with_seed(tmp_path, filtered):
    first, _ = _split(tmp_path, filtered, seed=7, out="a")
    again, _ = _split(tmp_path, filtered, seed=7, out="b")
    other, _ = _split(tmp_path, filtered, seed=8, out="c")
    for f in first.iterdir():
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name
    assert (first / "test.jsonl").read_bytes() != (other / "test.jsonl").read_bytes()


def _plant_duplicates(filtered: Path, dest: Path) -> list[list[int]]:
    """Copies of 30 records under new line numbers, changed only in case and whitespace; returns the groups' ids."""
    records = read_jsonl(filtered)
    next_id = max(r["id"] for r in records) + 1
    groups = []
    for n, r in enumerate(records[:30]):
        copies = 1 + n % 3
        ids = [r["id"]]
        for _ in range(copies):
            records.append({**r, "id": next_id, "instruction": "  " + r["instruction"].upper(),
                            "response": r["response"].replace(" ", "\n ")})
            ids.append(next_id)
            next_id += 1
        groups.append(ids)
    dest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return groups


def test_duplicates_never_straddle_train_validation_and_test(tmp_path, filtered):
    planted = _plant_duplicates(filtered, tmp_path / "with_duplicates.jsonl")
    out, sizes = _split(tmp_path, tmp_path / "with_duplicates.jsonl", test_size=200, val_size=100)
    where = {}
    for split in ("test", "val", "train_15k"):
        for r in read_jsonl(out / f"{split}.jsonl"):
            where.setdefault(r["id"], set()).add(split)
    listed = list(csv.DictReader(open(out / "duplicate_groups.csv")))
    assert sorted(tuple(int(i) for i in row["ids"].split()) for row in listed) == sorted(map(tuple, planted))
    held_out = 0
    for ids, row in zip(sorted(planted), sorted(listed, key=lambda row: int(row["ids"].split()[0]))):
        splits = set().union(*(where.get(i, set()) for i in ids))
        assert len(splits) == 1, (ids, splits)
        if splits == {"train_15k"}:
            assert all(i in where for i in ids) and row["split"] == "train" and row["copies_dropped"] == "0"
        else:  # a held-out group keeps one record and drops its copies
            held_out += 1
            assert sum(i in where for i in ids) == 1 and row["split"] in ("test", "val")
            assert int(row["copies_dropped"]) == len(ids) - 1
    assert held_out > 0 and sizes["test"] == 200 and sizes["val"] == 100


def test_a_file_without_duplicates_splits_as_before_and_lists_no_group(tmp_path, filtered):
    out, _ = _split(tmp_path, filtered)
    assert (out / "duplicate_groups.csv").read_text() == "group,ids,records,split,copies_dropped\n"


def test_subset_larger_than_pool_is_a_clear_error(tmp_path, filtered):
    with pytest.raises(DataError, match=r"data.subsets.5k: 100000 records asked for, but the training pool"):
        _split(tmp_path, filtered, subsets={"1k": 10, "5k": 100000})
    assert not (tmp_path / "out").exists()


def test_test_split_larger_than_data_is_a_clear_error(tmp_path, filtered):
    with pytest.raises(DataError, match=r"data.test_size \(10000\) \+ data.val_size \(20\) must leave"):
        _split(tmp_path, filtered, test_size=10000)


def test_quotas_follow_largest_remainder():
    assert data._quotas({"a": 5, "b": 3, "c": 2}, 5) == {"a": 3, "b": 1, "c": 1}
    assert sum(data._quotas({"a": 1, "b": 1, "c": 1}, 2).values()) == 2


def test_stratified_split_rejects_impossible_sizes():
    records = [{"category": "a"}] * 3
    with pytest.raises(DataError, match="cannot draw 3 records from a pool of 3"):
        data.stratified_split(records, 3, np.random.default_rng(0))


# --------------------------------------------------------------------------
# the real Dolly 15k, where a copy exists (shared/data/README.md)
# --------------------------------------------------------------------------


def test_real_dolly_end_to_end(real_dolly, tmp_path, monkeypatch):
    monkeypatch.setenv(data.LOCAL_COPY_ENV, str(real_dolly))
    raw = data.fetch_dolly(
        tmp_path / "raw.jsonl",
        "http://unused",
        "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec",
        13085339,
    )
    counts = data.filter_context(raw, tmp_path / "filtered.jsonl")
    assert counts["read"] == 15011
    assert counts["written"] == counts["read"] - counts["with_context"] - counts["blank"]
    subsets = {"1k": 1000, "5k": 5000, "15k": "all"}
    out, sizes = _split(tmp_path, tmp_path / "filtered.jsonl", subsets=subsets, test_size=500, val_size=200)
    assert sizes["test"] == 500 and sizes["train_1k"] == 1000 and sizes["train_5k"] == 5000
    assert sizes["train_15k"] == counts["written"] - 700
    test_ids = {r["id"] for r in read_jsonl(out / "test.jsonl")}
    for s in subsets:
        assert not test_ids & {r["id"] for r in read_jsonl(out / f"train_{s}.jsonl")}
    again, _ = _split(tmp_path, tmp_path / "filtered.jsonl", subsets=subsets, test_size=500, val_size=200, out="b")
    other, _ = _split(tmp_path, tmp_path / "filtered.jsonl", subsets=subsets, test_size=500, val_size=200, seed=8, out="c")
    for f in out.iterdir():
        assert f.read_bytes() == (again / f.name).read_bytes()
    assert (out / "test.jsonl").read_bytes() != (other / "test.jsonl").read_bytes()
