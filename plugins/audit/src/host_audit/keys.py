"""Ed25519 signing keys: generation (0600 files), loading, export, rotation, signed messages.

The private key is a PEM (PKCS#8) file readable only by its owner; loading refuses a key file that
group or others can read. The key id is the first 16 hex digits of
``SHA-256("host-audit ed25519\\n" ‖ raw public key)``.

What is signed (UTF-8 text, every line ending in a newline)::

    checkpoint:   host-audit checkpoint v1 / <log id> / <size> / <head hex> / <ts ms>
    endorsement:  host-audit key v1 / <log id> / <new key id> / <new raw public key, base64>
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from host_audit.errors import KeyFileError

__all__ = [
    "PublicKey",
    "SigningKey",
    "checkpoint_message",
    "endorsement_message",
    "key_id_of",
    "load_or_create_key",
    "load_public_key_file",
    "load_signing_key",
    "retired_key_path",
    "rotate_key_file",
    "write_private_file",
]


def key_id_of(public_raw: bytes) -> str:
    """The short, stable id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(b"host-audit ed25519\n" + public_raw).hexdigest()[:16]


def checkpoint_message(log: str, size: int, head: str, ts: int) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    return f"host-audit checkpoint v1\n{log}\n{size}\n{head}\n{ts}\n".encode()


def endorsement_message(log: str, key_id: str, public_b64: str) -> bytes:
    """The exact bytes the previous key signs to endorse a new key."""
    return f"host-audit key v1\n{log}\n{key_id}\n{public_b64}\n".encode()


class PublicKey:
    """A verification key (from the log, a pinned file, or a signing key)."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = raw
        self.key_id = key_id_of(raw)
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        return cls(base64.b64decode(text, validate=True))

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (what ``export-key`` writes; ``openssl pkey -pubin`` reads it)."""
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r})"


class SigningKey:
    """The log's private key. Never printed: ``repr`` shows only the key id."""

    __slots__ = ("_private", "public")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def _ensure_private_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (fails if it exists), write, fsync file and directory."""
    _ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case a umask without owner bits is in effect
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link (not rename) so an existing key is never replaced: two first starts cannot race.
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"key file {path} appeared while creating it; not overwriting it") from None
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_signing_key(path: Path) -> SigningKey:
    """Load a private key file; refuses one that group or others may read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"signing key {path} does not exist") from None
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is a {type(private).__name__}, not an Ed25519 key")
    return SigningKey(private)


def load_or_create_key(path: Path) -> tuple[SigningKey, bool]:
    """Load the key at ``path``, generating it (0600, directory 0700) on first run.

    Returns ``(key, created)``.
    """
    if path.exists():
        return load_signing_key(path), False
    key = SigningKey.generate()
    try:
        write_private_file(path, key.private_pem())
    except OSError as exc:
        raise KeyFileError(f"cannot create signing key {path}: {exc.strerror or exc}") from None
    return key, True


def load_public_key_file(path: Path) -> PublicKey:
    """A pinned public key: PEM (as written by ``export-key``) or one line of raw base64."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from None
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"public key {path} is not a valid PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"public key {path} is a {type(key).__name__}, not an Ed25519 key")
        return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    try:
        return PublicKey.from_b64(data.decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"public key {path} is neither PEM nor a base64 Ed25519 key") from None


def retired_key_path(key_file: Path) -> Path:
    """Where ``rotate-key`` keeps the previous key until the host has endorsed the new one."""
    return key_file.with_name(key_file.name + ".retired")


def rotate_key_file(key_file: Path) -> tuple[SigningKey, SigningKey]:
    """Move the current key to ``<key_file>.retired`` and generate a new one.

    The host, on its next start, writes the new key into the log endorsed by the retired key.
    Returns ``(old, new)``. Refuses while an unconsumed retired key exists.
    """
    retired = retired_key_path(key_file)
    if retired.exists():
        raise KeyFileError(
            f"{retired} already exists (a rotation not yet picked up by the host?); start the host "
            f"once so it endorses the current key, then delete {retired} and rotate again"
        )
    old = load_signing_key(key_file)
    os.rename(key_file, retired)
    try:
        new, _ = load_or_create_key(key_file)
    except BaseException:
        os.rename(retired, key_file)
        raise
    return old, new
