"""Identity resolvers: the mapping file (TOML and JSON), custom factories, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from host_dingtalk_connector.config import IdentitySettings
from host_dingtalk_connector.errors import DingTalkConfigError
from host_dingtalk_connector.identity import MappingFileResolver, NullResolver, load_resolver

MAPPING = """
[staffId]
manager1234 = "alice"
[unionId]
ZPbvexample = "bob"
[senderId]
"$:LWCP_v1:$S3nderEnc==" = "carol"
"""


def test_toml_mapping_lookup_order(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text(MAPPING)
    resolver = MappingFileResolver.from_file(path)
    assert len(resolver) == 3
    # staffId wins over unionId and senderId.
    assert resolver.resolve({"staffId": "manager1234", "unionId": "ZPbvexample"}) == "alice"
    assert resolver.resolve({"staffId": "nobody", "unionId": "ZPbvexample"}) == "bob"
    assert resolver.resolve({"senderId": "$:LWCP_v1:$S3nderEnc=="}) == "carol"
    assert resolver.resolve({"staffId": "nobody"}) is None
    assert resolver.resolve({}) is None


def test_json_mapping(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"unionId": {"u": "dave"}}))
    assert MappingFileResolver.from_file(path).resolve({"unionId": "u"}) == "dave"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[staffid]\na = 'x'", "unknown table"),
        ("[staffId]\na = 1", "non-empty string"),
        ("staffId = 'x'", "must be a table"),
        ("[staffId\n", "invalid syntax"),
    ],
)
def test_bad_mapping_files(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(content)
    with pytest.raises(DingTalkConfigError) as info:
        MappingFileResolver.from_file(path)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DingTalkConfigError, match="cannot read"):
        load_resolver(IdentitySettings(mapping_file=str(tmp_path / "none.toml")))


def test_default_is_null_resolver() -> None:
    assert isinstance(load_resolver(IdentitySettings()), NullResolver)


class Directory:
    def __init__(self, settings: IdentitySettings) -> None:
        self.prefix = settings.options.get("prefix", "")

    def resolve(self, ids: Any) -> str | None:
        return self.prefix + ids["staffId"] if "staffId" in ids else None


def make_directory(settings: IdentitySettings) -> Directory:
    return Directory(settings)


def not_a_resolver(settings: IdentitySettings) -> object:
    return object()


def test_custom_resolver_factory() -> None:
    resolver = load_resolver(IdentitySettings(resolver=f"{__name__}:make_directory", options={"prefix": "site:"}))
    assert resolver.resolve({"staffId": "u1"}) == "site:u1"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("nocolon", "expected"), ("no_such_module_xyz:f", "cannot import"), (f"{__name__}:not_a_resolver", "no resolve")],
)
def test_custom_resolver_errors(spec: str, problem: str) -> None:
    with pytest.raises(DingTalkConfigError, match=problem):
        load_resolver(IdentitySettings(resolver=spec))
