"""``python -m host audit ...``: verify a log, export or rotate the signing key, hash an id.

Exit codes: 0 success (log valid), 1 the log is invalid or the action failed, 2 usage or
configuration error (bad directory, unreadable key file, invalid ``[audit]`` section).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

import msgspec

from host.config import load_config
from host.errors import ConfigError
from host_audit.errors import AuditError, KeyFileError
from host_audit.keys import PublicKey, load_public_key_file, load_signing_key, rotate_key_file
from host_audit.messages import IdHasher, load_or_create_salt
from host_audit.segments import LOCK_FILE
from host_audit.settings import AuditSection, LogSettings
from host_audit.verify import verify_log

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``audit`` actions to the host CLI's ``audit`` subcommand."""
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser(
        "verify",
        help="check the hash chain, sequence, timestamps and every signed checkpoint",
        description="Verify the audit log. Prints a summary, or the first bad record and why "
        "(exit 1). Pin the signing key with --public-key; check against the off-host copy of the "
        "checkpoints with --checkpoints.",
    )
    verify.add_argument("dir", nargs="?", help="audit directory (default: $HOST_AUDIT_DIR, else [audit] dir)")
    verify.add_argument("--public-key", action="append", default=[], metavar="FILE",
                        help="trusted public key (PEM from export-key, or base64); repeat for rotated keys")
    verify.add_argument("--checkpoints", action="append", default=None, metavar="FILE",
                        help="checkpoint file(s) to check the log against (default: DIR/checkpoints.jsonl)")
    verify.add_argument("--clock-tolerance-ms", type=int, default=None, metavar="MS",
                        help="how far a timestamp may go back (default: [audit] clock_tolerance_ms, 5000)")
    verify.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="worker processes (default: one per CPU, at most 4, for logs over 24 MiB)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    export = sub.add_parser("export-key", help="print (or write) the public key that verifies checkpoints")
    export.add_argument("--out", metavar="FILE", help="write the PEM here instead of stdout")
    export.add_argument("--key-file", metavar="FILE", help="private key file (default: [audit] key_file)")
    rotate = sub.add_parser("rotate-key", help="replace the signing key (host stopped); the old key endorses the new")
    rotate.add_argument("--key-file", metavar="FILE", help="private key file (default: [audit] key_file)")
    hash_id = sub.add_parser("hash-id", help="the hash an id has in message-metadata records (to search for it)")
    hash_id.add_argument("value", help="a message, user or conversation id")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m host audit``; returns the exit code."""
    try:
        section = _section(args)
        settings = LogSettings.from_section(section)
        action = args.audit_command
        if action == "verify":
            return _verify(args, section, settings)
        if action == "export-key":
            return _export_key(args, settings)
        if action == "rotate-key":
            return _rotate_key(args, settings)
        return _hash_id(args, section, settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (AuditError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _section(args: argparse.Namespace) -> AuditSection:
    config = load_config(getattr(args, "config", None))
    section = config.validate_section("audit", AuditSection)
    assert isinstance(section, AuditSection)
    return section


def _verify(args: argparse.Namespace, section: AuditSection, settings: LogSettings) -> int:
    directory = Path(args.dir) if args.dir else settings.directory
    if not directory.is_dir():
        print(f"error: {directory} is not a directory (pass the audit directory, or set [audit] dir)",
              file=sys.stderr)
        return 2
    keys: list[PublicKey] = [load_public_key_file(Path(p)) for p in args.public_key]
    checkpoint_files = [Path(p) for p in args.checkpoints] if args.checkpoints is not None else None
    for path in checkpoint_files or []:
        if not path.is_file():
            print(f"error: checkpoint file {path} does not exist", file=sys.stderr)
            return 2
    tolerance = args.clock_tolerance_ms if args.clock_tolerance_ms is not None else section.clock_tolerance_ms
    if args.jobs is not None and args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    report = verify_log(directory, public_keys=keys or None, checkpoint_files=checkpoint_files,
                        clock_tolerance_ms=tolerance, jobs=args.jobs)
    if args.json:
        payload = {
            "ok": report.ok,
            "problem": None if report.problem is None else {
                "where": report.problem.where, "seq": report.problem.seq,
                "kind": report.problem.kind, "reason": report.problem.reason,
            },
            "records": report.records,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "segments": report.segments,
            "checkpoints_in_log": report.checkpoints_in_log,
            "checkpoints_in_files": report.checkpoints_in_files,
            "keys_used": report.keys_used,
            "pinned": report.pinned,
            "clean_end": report.clean_end,
            "unanchored": report.unanchored,
            "findings": report.findings,
            "warnings": report.warnings,
            "seconds": report.elapsed,
            "jobs": report.jobs,
        }
        print(msgspec.json.encode(payload).decode())
    else:
        print(report.summary())
    return 0 if report.ok else 1


def _key_file(args: argparse.Namespace, settings: LogSettings) -> Path:
    return Path(args.key_file) if args.key_file else settings.key_file


def _export_key(args: argparse.Namespace, settings: LogSettings) -> int:
    key_file = _key_file(args, settings)
    if not key_file.exists():
        print(f"error: no signing key at {key_file}: the host creates it on its first start with the audit plugin",
              file=sys.stderr)
        return 2
    public = load_signing_key(key_file).public
    pem = public.pem()
    if args.out:
        Path(args.out).write_bytes(pem)
        print(f"public key {public.key_id} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return 0


def _rotate_key(args: argparse.Namespace, settings: LogSettings) -> int:
    lock = settings.directory / LOCK_FILE
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"error: the audit log in {settings.directory} is open (host running); stop the host first",
                  file=sys.stderr)
            return 1
        finally:
            os.close(fd)  # also releases the lock we may have taken
    old, new = rotate_key_file(_key_file(args, settings))
    print(f"signing key rotated: {old.key_id} -> {new.key_id}")
    print("On its next start the host records the new key, endorsed by the old one, and deletes the old key.")
    print("Export the new public key for verifiers: python -m host audit export-key --out audit-new.pem")
    print("Verifiers that pin keys need both: --public-key old.pem --public-key new.pem")
    return 0


def _hash_id(args: argparse.Namespace, section: AuditSection, settings: LogSettings) -> int:
    salt_file = settings.salt_file(section.messages)
    if not salt_file.exists():
        print(f"error: no message-id salt at {salt_file} (message auditing never ran)", file=sys.stderr)
        return 2
    print(IdHasher(load_or_create_salt(salt_file))(args.value))
    return 0
