"""``python -m host audit ...`` through the host's CLI (in process and as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _logtools import generate_log, lines_of, write_lines
from host_audit.keys import SigningKey, load_signing_key
from host_audit.log import AuditLog
from host_audit.messages import IdHasher, load_or_create_salt
from host_audit.segments import list_segments
from host_audit.settings import LogSettings

from host.cli import main


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads ./host.toml and writes ./logs/error.log: keep both inside the test's directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOST_CONFIG", raising=False)


@pytest.fixture
def small_log(tmp_path: Path) -> Path:
    generate_log(tmp_path / "audit", entries=300, segment_max_records=100)
    return tmp_path / "audit"


def _tamper(directory: Path) -> None:
    segment = list_segments(directory)[1]
    lines = lines_of(segment)
    lines[7] = lines[7].replace(b"ticket", b"tocket")
    write_lines(segment, lines)


def test_verify_ok(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(small_log)]) == 0
    out = capsys.readouterr().out
    assert "audit log OK" in out and "records/s" in out and "NOT pinned" in out


def test_verify_uses_the_configured_directory(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (small_log.parent / "host.toml").write_text(f'[audit]\ndir = "{small_log}"\n')
    assert main(["audit", "verify"]) == 0
    assert str(small_log) in capsys.readouterr().out


def test_verify_reports_the_first_bad_record(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tamper(small_log)
    assert main(["audit", "verify", str(small_log)]) == 1
    out = capsys.readouterr().out
    assert "audit log INVALID" in out
    assert f"{list_segments(small_log)[1].name} line 8" in out and "modified" in out


def test_verify_json(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tamper(small_log)
    assert main(["audit", "verify", "--json", "--jobs", "2", str(small_log)]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and payload["problem"]["kind"] == "hash_mismatch"
    assert payload["jobs"] == 2


def test_verify_usage_errors(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(small_log / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["audit", "verify", str(small_log), "--public-key", str(small_log / "nope.pem")]) == 2
    assert "cannot read public key" in capsys.readouterr().err


def test_exported_key_pins_verification(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = str(small_log / "signing.key")
    pem = small_log.parent / "audit.pem"
    assert main(["audit", "export-key", "--key-file", key_file, "--out", str(pem)]) == 0
    assert pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert main(["audit", "export-key", "--key-file", key_file]) == 0
    assert capsys.readouterr().out == pem.read_text()
    assert main(["audit", "verify", str(small_log), "--public-key", str(pem)]) == 0
    assert "pinned with --public-key" in capsys.readouterr().out
    other = small_log.parent / "other.pem"
    other.write_bytes(SigningKey.generate().public.pem())
    assert main(["audit", "verify", str(small_log), "--public-key", str(other)]) == 1
    assert "not a pinned key" in capsys.readouterr().out


def test_export_key_without_a_key_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export-key", "--key-file", str(tmp_path / "missing.key")]) == 2
    assert "creates it on its first start" in capsys.readouterr().err


def test_rotate_key_refuses_while_the_log_is_open(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (small_log.parent / "host.toml").write_text(f'[audit]\ndir = "{small_log}"\n')
    log = AuditLog.open(LogSettings.for_directory(small_log))
    try:
        assert main(["audit", "rotate-key"]) == 1
        assert "stop the host first" in capsys.readouterr().err
    finally:
        log.close()
    old = load_signing_key(small_log / "signing.key")
    assert main(["audit", "rotate-key"]) == 0
    new = load_signing_key(small_log / "signing.key")
    assert new.key_id != old.key_id and f"{old.key_id} -> {new.key_id}" in capsys.readouterr().out


def test_hash_id_matches_the_recorded_hashes(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (small_log.parent / "host.toml").write_text(f'[audit]\ndir = "{small_log}"\n')
    assert main(["audit", "hash-id", "user-1"]) == 2  # no salt yet: message auditing never ran
    capsys.readouterr()
    salt = load_or_create_salt(small_log / "message-ids.salt")
    assert main(["audit", "hash-id", "user-1"]) == 0
    assert capsys.readouterr().out.strip() == IdHasher(salt)("user-1")


def test_invalid_audit_section_is_a_config_error(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (small_log.parent / "host.toml").write_text("[audit]\nfsync = 'sometimes'\n")
    assert main(["audit", "verify", str(small_log)]) == 2
    assert "[audit] fsync" in capsys.readouterr().err


def test_python_m_host_audit_verify_subprocess(small_log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_")}
    command = [sys.executable, "-m", "host", "audit", "verify", str(small_log)]
    ok = subprocess.run(command, capture_output=True, text=True, cwd=small_log.parent, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "audit log OK" in ok.stdout
    _tamper(small_log)
    bad = subprocess.run(command, capture_output=True, text=True, cwd=small_log.parent, env=env, timeout=60)
    assert bad.returncode == 1
    assert "audit log INVALID" in bad.stdout and "line 8" in bad.stdout
