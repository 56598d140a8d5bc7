"""Mutation tests: every kind of tampering with a generated 10,000-record log is detected.

Each test tampers with a fresh copy of the same pristine log (``log_copy``) and checks that
``verify_log`` reports the first bad record, at the right place, for the right reason. "Attacker"
variants re-chain the records after their edit (SHA-256 needs no secret), so only what needs the
signing key — the checkpoints — can give them away. Every test runs twice: sequentially, and with
two worker processes scanning 64 KiB runs (the parallel mode of large logs), which must report
exactly the same first problem.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from _logtools import all_records, lines_of, locate, rewrite, write_lines
from host_audit.keys import SigningKey, load_signing_key
from host_audit.segments import CHECKPOINTS_FILE, list_segments
from host_audit.verify import VerifyReport
from host_audit.verify import verify_log as _verify_log

_MODE: dict[str, int] = {}


@pytest.fixture(autouse=True, params=[1, 2], ids=["sequential", "parallel"])
def _verify_mode(request: pytest.FixtureRequest) -> None:
    _MODE.clear()
    _MODE.update(jobs=request.param, chunk_bytes=64 * 1024)


def verify_log(directory: Path, **kwargs: object) -> VerifyReport:
    return _verify_log(directory, **_MODE, **kwargs)  # type: ignore[arg-type]


def _problem(directory: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    report = verify_log(directory, **kwargs)
    assert not report.ok, report.summary()
    assert report.problem is not None
    return report.problem


def _entry_line(directory: Path, nth: int) -> tuple[Path, int]:
    return locate(directory, lambda r: r["type"] == "entry", nth)


# -- the pristine log ------------------------------------------------------------------------------


def test_pristine_log_verifies_pinned_and_against_the_offhost_checkpoints(log_copy: Path, offhost: Path) -> None:
    key = load_signing_key(log_copy / "signing.key").public
    report = verify_log(log_copy, public_keys=[key], checkpoint_files=[offhost, log_copy / CHECKPOINTS_FILE])
    assert report.ok, report.summary()
    assert report.jobs == _MODE["jobs"]
    entries = [r for r in all_records(log_copy) if r["type"] == "entry"]
    assert len(entries) == 10_000
    assert report.records == len(all_records(log_copy))
    assert report.segments == len(list_segments(log_copy)) >= 4
    assert report.pinned and report.keys_used == [key.key_id]
    assert report.clean_end and report.unanchored == 0
    assert report.checkpoints_in_log >= 20
    assert report.checkpoints_in_files == 2 * report.checkpoints_in_log
    assert "audit log OK" in report.summary()


def test_unpinned_verification_says_the_key_comes_from_the_log(log_copy: Path) -> None:
    report = verify_log(log_copy)
    assert report.ok
    assert not report.pinned
    assert "NOT pinned" in report.summary()


# -- edited bytes ----------------------------------------------------------------------------------


def _flip(path: Path, offset: int, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("_verify_mode", "seed"),
    [(1, seed) for seed in range(60)] + [(2, seed) for seed in range(60, 75)],  # fewer in parallel: slower
    indirect=["_verify_mode"],
)
def test_any_edited_byte_is_detected_at_its_line(log_copy: Path, seed: int) -> None:
    rng = random.Random(seed)
    segments = list_segments(log_copy)
    path = rng.choice(segments)
    data = path.read_bytes()
    offset = rng.randrange(len(data))
    line_no = data.count(b"\n", 0, offset) + 1
    _flip(path, offset, rng)
    problem = _problem(log_copy)
    if data[offset] != ord("\n"):
        assert problem.where == f"{path.name} line {line_no}", (offset, problem)


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ("hash", "hash_mismatch"),  # a hex digit of h
        ("seq", "sequence"),  # a digit of the sequence number
        ("details", "hash_mismatch"),  # inside the audited payload
        ("framing", "malformed"),  # the ,"h":" marker
    ],
)
def test_edited_field_is_reported_with_its_reason(log_copy: Path, part: str, kind: str) -> None:
    path, index = _entry_line(log_copy, 4321)
    lines = lines_of(path)
    line = bytearray(lines[index])
    if part == "hash":
        pos = len(line) - 10
        line[pos] = ord("0") if line[pos] != ord("0") else ord("1")
    elif part == "seq":
        pos = line.index(b'"seq":') + 6
        line[pos] = ord("9") if line[pos] != ord("9") else ord("8")
    elif part == "details":
        line[line.index(b"ticket") : line.index(b"ticket") + 6] = b"tickex"
    else:
        line[len(line) - 70] = ord("g")  # ,"h":" -> ,"g":"  (still valid JSON!)
    lines[index] = bytes(line)
    write_lines(path, lines)
    problem = _problem(log_copy)
    assert problem.kind == kind
    assert problem.where == f"{path.name} line {index + 1}"


# -- deleted, inserted, reordered records ----------------------------------------------------------


def test_deleted_record_is_detected(log_copy: Path) -> None:
    path, index = _entry_line(log_copy, 5000)
    lines = lines_of(path)
    seq = all_records(log_copy)[0]["seq"]  # noqa: F841 - (documentation: the log starts at 0)
    deleted = lines.pop(index)
    write_lines(path, lines)
    problem = _problem(log_copy)
    assert problem.kind == "sequence"
    assert problem.where == f"{path.name} line {index + 1}"
    assert "missing" in problem.reason and str(problem.seq) in deleted.decode()


def test_deleted_checkpoint_record_is_detected(log_copy: Path) -> None:
    path, index = locate(log_copy, lambda r: r["type"] == "checkpoint" and r["reason"] == "count", 3)
    lines = lines_of(path)
    del lines[index]
    write_lines(path, lines)
    assert _problem(log_copy).kind == "sequence"


def test_deleted_last_record_of_a_segment_is_detected(log_copy: Path) -> None:
    path = list_segments(log_copy)[1]
    lines = lines_of(path)
    write_lines(path, lines[:-1])
    problem = _problem(log_copy)
    assert problem.kind == "segment_missing"
    assert problem.where == f"{list_segments(log_copy)[2].name} line 1"


def test_inserted_duplicate_record_is_detected(log_copy: Path) -> None:
    path, index = _entry_line(log_copy, 777)
    lines = lines_of(path)
    lines.insert(index + 1, lines[index])
    write_lines(path, lines)
    problem = _problem(log_copy)
    assert problem.kind == "sequence" and "inserted or records reordered" in problem.reason
    assert problem.where == f"{path.name} line {index + 2}"


def test_inserted_forged_record_with_rechained_log_is_caught_by_the_next_checkpoint(log_copy: Path) -> None:
    def insert(segments):  # type: ignore[no-untyped-def]
        recs = segments[1][1]
        forged = dict(recs[10])
        forged["action"] = "grant"
        forged["target"] = "role:superuser"
        recs.insert(11, forged)

    rewrite(log_copy, insert, renumber=True)
    problem = _problem(log_copy)
    assert problem.kind == "bad_signature"
    assert problem.where.startswith(list_segments(log_copy)[1].name)


def test_reordered_records_are_detected(log_copy: Path) -> None:
    path, index = _entry_line(log_copy, 2024)
    lines = lines_of(path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    write_lines(path, lines)
    problem = _problem(log_copy)
    assert problem.kind == "sequence"
    assert problem.where == f"{path.name} line {index + 1}"


def test_reordered_and_renumbered_records_are_caught_by_a_checkpoint(log_copy: Path) -> None:
    def swap(segments):  # type: ignore[no-untyped-def]
        recs = segments[3][1]
        recs[20], recs[40] = recs[40], recs[20]

    rewrite(log_copy, swap, renumber=True)
    problem = _problem(log_copy)
    # Either the moved timestamps or the checkpoint after them give it away.
    assert problem.kind in {"bad_signature", "time_reversed"}


def test_timestamp_pushed_back_beyond_the_tolerance_is_detected(log_copy: Path) -> None:
    def backdate(segments):  # type: ignore[no-untyped-def]
        segments[1][1][50]["ts"] -= 60_000

    rewrite(log_copy, backdate)
    problem = _problem(log_copy)
    assert problem.kind == "time_reversed"
    assert problem.where == f"{list_segments(log_copy)[1].name} line 51"
    assert "tolerance 5000 ms" in problem.reason
    # With a tolerance larger than the step, the timestamp passes and the signature catches it.
    assert _problem(log_copy, clock_tolerance_ms=120_000).kind == "bad_signature"


# -- truncation ------------------------------------------------------------------------------------


def test_truncated_tail_is_detected_against_the_offhost_checkpoints(log_copy: Path, offhost: Path) -> None:
    *_, before_last, last = list_segments(log_copy)
    last.unlink()  # the last segment, with the final checkpoint, and 700 records before it: gone
    lines = lines_of(before_last)
    write_lines(before_last, lines[: len(lines) - 700])
    # The attacker also rewinds the local checkpoint file: the off-host copy still knows.
    local = log_copy / CHECKPOINTS_FILE
    notes = lines_of(local)
    remaining = {r["seq"] for r in all_records(log_copy)}
    write_lines(local, [n for n in notes if int(n.split(b'"size":')[1].split(b",")[0]) in remaining])
    assert verify_log(log_copy).ok  # indistinguishable from a crash without the off-host copy...
    report = verify_log(log_copy, checkpoint_files=[offhost])
    assert not report.ok
    assert report.problem is not None and report.problem.kind == "truncated"
    assert "truncated" in report.problem.reason


def test_truncation_without_any_checkpoint_file_is_flagged_as_unanchored(log_copy: Path) -> None:
    last = list_segments(log_copy)[-1]
    lines = lines_of(last)
    write_lines(last, lines[:-3])
    (log_copy / CHECKPOINTS_FILE).unlink()
    report = verify_log(log_copy)
    assert report.ok  # the documented limit: nothing anchors the tail...
    assert not report.clean_end  # ...but the report says the log did not end with a final checkpoint
    assert "no checkpoint file" in report.summary()


def test_tail_cut_mid_line_is_detected(log_copy: Path) -> None:
    last = list_segments(log_copy)[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-150])
    problem = _problem(log_copy)
    assert problem.kind == "torn_tail"
    assert problem.where == last.name


# -- checkpoints and keys --------------------------------------------------------------------------


def test_forged_checkpoint_signature_is_detected(log_copy: Path) -> None:
    def forge(segments):  # type: ignore[no-untyped-def]
        for rec in segments[3][1]:
            if rec["type"] == "checkpoint":
                rec["sig"] = rec["sig"][:10] + ("A" if rec["sig"][10] != "A" else "B") + rec["sig"][11:]
                return

    rewrite(log_copy, forge, rewrite_checkpoint_file=False)
    problem = _problem(log_copy)
    assert problem.kind == "bad_signature"
    assert problem.where.startswith(list_segments(log_copy)[3].name)


def test_checkpoint_resigned_with_another_key_is_detected(log_copy: Path) -> None:
    attacker = SigningKey.generate()

    def edit(segments):  # type: ignore[no-untyped-def]
        segments[1][1][30]["details"]["reason"] = "nothing to see"

    rewrite(log_copy, edit, key=attacker)
    problem = _problem(log_copy)
    assert problem.kind == "wrong_key" and f"signed with key {attacker.key_id}" in problem.reason


def test_log_fully_rewritten_with_another_key_needs_a_pin_or_the_offhost_copy(log_copy: Path, offhost: Path) -> None:
    genuine = load_signing_key(log_copy / "signing.key").public
    attacker = SigningKey.generate()

    def edit(segments):  # type: ignore[no-untyped-def]
        segments[1][1][30]["details"]["reason"] = "nothing to see"

    rewrite(log_copy, edit, key=attacker, replace_announced_key=True)
    # The documented limit: trusting the key found in the log, a complete rewrite is consistent.
    assert verify_log(log_copy).ok
    pinned = _problem(log_copy, public_keys=[genuine])
    assert pinned.kind == "untrusted_key" and "not a pinned key" in pinned.reason
    assert _problem(log_copy, checkpoint_files=[offhost]).kind in {"untrusted_key", "checkpoint_mismatch"}


def test_checkpoint_head_not_matching_the_records_is_detected(log_copy: Path) -> None:
    def edit(segments):  # type: ignore[no-untyped-def]
        segments[1][1][30]["details"]["reason"] = "changed"

    rewrite(log_copy, edit)
    assert _problem(log_copy).kind == "bad_signature"


def test_edited_offhost_checkpoint_is_detected(log_copy: Path, offhost: Path) -> None:
    lines = lines_of(offhost)
    lines[3] = lines[3].replace(b'"size":', b'"size":1')
    write_lines(offhost, lines)
    problem = _problem(log_copy, checkpoint_files=[offhost])
    assert problem.where == "checkpoints.jsonl line 4"
    assert problem.kind in {"bad_signature", "checkpoint_file"}


def test_checkpoint_file_of_another_log_is_refused(log_copy: Path, tmp_path: Path) -> None:
    from _logtools import generate_log

    generate_log(tmp_path / "other", entries=20)
    problem = _problem(log_copy, checkpoint_files=[tmp_path / "other" / CHECKPOINTS_FILE])
    assert problem.kind == "foreign"


# -- segments ----------------------------------------------------------------------------------------


def test_segment_removed_from_the_middle_is_detected(log_copy: Path) -> None:
    segments = list_segments(log_copy)
    segments[2].unlink()
    problem = _problem(log_copy)
    assert problem.kind == "segment_missing"
    assert problem.where == f"{segments[3].name} line 1"


def test_first_segment_removed_without_an_expiry_record_is_detected(log_copy: Path) -> None:
    list_segments(log_copy)[0].unlink()
    problem = _problem(log_copy)
    assert problem.kind == "head_missing"


def test_renamed_segment_is_detected(log_copy: Path) -> None:
    segments = list_segments(log_copy)
    shutil.move(segments[1], segments[1].with_name("segment-00000099.jsonl"))
    assert _problem(log_copy).kind in {"renamed", "segment_missing"}


def test_empty_segment_file_is_reported(log_copy: Path) -> None:
    (log_copy / "segment-00000099.jsonl").write_bytes(b"")
    assert _problem(log_copy).kind == "empty_segment"
