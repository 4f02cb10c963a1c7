"""API keys without a server: the key file, authentication, roles and scopes, reload, and `braid keys`."""

from __future__ import annotations

import json
import logging
import os
import stat
import types
from collections import namedtuple
from pathlib import Path

import pytest

from braid.index.errors import PermissionDenied, Unauthenticated
from braid.service import auth
from braid.service.auth import ROLE_OF_METHOD, ApiKeys, Principal, Role, generate_key, hash_key
from braid.service.cli import main

READ_KEY, WRITE_KEY, ADMIN_KEY, SCOPED_KEY = (generate_key() for _ in range(4))


def entry(name: str, key: str, role: str, collections: list[str] | None = None) -> dict:
    out = {"name": name, "hash": hash_key(key), "role": role}
    if collections is not None:
        out["collections"] = collections
    return out


def write(path: Path, entries: list) -> Path:
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "keys.json",
        [
            entry("reader", READ_KEY, "read"),
            entry("ingest", WRITE_KEY, "write"),
            entry("ops", ADMIN_KEY, "admin"),
            entry("articles-only", SCOPED_KEY, "write", ["articles", "news"]),
        ],
    )


def bearer(key: str) -> list[tuple[str, str]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {key}")]


# ------------------------------------------------------------------ keys and hashes


def test_generated_keys_are_random_and_hash_to_sha256_hex():
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("braid_") and len(k) >= 6 + 43 for k in keys)
    digest = hash_key("abc")
    assert digest == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_loads_names_roles_and_scopes(key_file: Path):
    keys = ApiKeys(key_file)
    assert keys.principals == (
        Principal("reader", Role.READ, None),
        Principal("ingest", Role.WRITE, None),
        Principal("ops", Role.ADMIN, None),
        Principal("articles-only", Role.WRITE, frozenset({"articles", "news"})),
    )
    assert ApiKeys(write(key_file, [])).principals == ()


def test_principal_scope():
    scoped = Principal("s", Role.READ, frozenset({"a"}))
    assert scoped.allows("a") and not scoped.allows("b")
    assert Principal("all", Role.READ, None).allows("anything")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', 'expected an object {"keys": [...]}'),
        ('{"keys": {"a": 1}}', 'expected an object {"keys": [...]}'),
        ('{"keys": ["x"]}', "keys[0]: must be an object"),
        ('{"keys": [{"name": "", "hash": "sha256:00", "role": "read"}]}', "keys[0]: name must be a non-empty string"),
        ('{"keys": [{"name": "a", "hash": "md5:00", "role": "read"}]}', "keys[0] ('a'): hash must be 'sha256:'"),
        ('{"keys": [{"name": "a", "hash": "HASH", "role": "superuser"}]}', "keys[0] ('a'): hash must be"),
        ('{"keys": [{"name": "a", "role": "read", "scope": ["x"]}]}', "keys[0] ('a'): unknown field(s) ['scope']"),
    ],
)
def test_bad_files_name_the_file_and_the_entry(tmp_path: Path, content: str, problem: str):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        ApiKeys(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_bad_role_duplicates_and_empty_scope_are_refused(tmp_path: Path):
    path = tmp_path / "keys.json"
    cases = [
        ([entry("a", READ_KEY, "read"), entry("b", WRITE_KEY, "superuser")], "keys[1] ('b'): role must be one of"),
        ([entry("a", READ_KEY, "read"), entry("a", WRITE_KEY, "read")], "keys[1] ('a'): duplicate name"),
        ([entry("a", READ_KEY, "read"), entry("b", READ_KEY, "admin")], "keys[1] ('b'): same hash"),
        ([entry("a", READ_KEY, "read", [])], "keys[0] ('a'): collections must be a non-empty list"),
        ([entry("a", READ_KEY, "read", "articles")], "collections must be a non-empty list"),  # type: ignore[arg-type]
    ]
    for entries, problem in cases:
        with pytest.raises(ValueError) as info:
            ApiKeys(write(path, entries))
        assert problem in str(info.value)


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"keys\.json: cannot read"):
        ApiKeys(tmp_path / "keys.json")


def test_a_raw_key_pasted_as_hash_is_never_echoed(tmp_path: Path):
    path = write(tmp_path / "keys.json", [{"name": "oops", "hash": ADMIN_KEY, "role": "admin"}])
    with pytest.raises(ValueError) as info:
        ApiKeys(path)
    assert "oops" in str(info.value)
    assert ADMIN_KEY not in str(info.value)


# ------------------------------------------------------------------ authenticate


def test_authenticate_finds_each_key(key_file: Path):
    keys = ApiKeys(key_file)
    assert keys.authenticate(bearer(READ_KEY)).name == "reader"
    assert keys.authenticate(bearer(ADMIN_KEY)).role is Role.ADMIN
    # grpc gives namedtuple-like _Metadatum items; the scheme is case-insensitive; -bin values are bytes
    metadatum = namedtuple("metadatum", ("key", "value"))
    assert keys.authenticate((metadatum("authorization", f"bearer  {WRITE_KEY} "),)).name == "ingest"
    assert keys.authenticate([("authorization", f"Bearer {SCOPED_KEY}".encode())]).name == "articles-only"


def test_missing_malformed_and_unknown_keys_are_unauthenticated(key_file: Path):
    keys = ApiKeys(key_file)
    with pytest.raises(Unauthenticated, match=r"missing API key: send 'authorization: Bearer <key>'"):
        keys.authenticate([("user-agent", "x")])
    with pytest.raises(Unauthenticated, match="malformed"):
        keys.authenticate([("authorization", f"Basic {READ_KEY}")])
    with pytest.raises(Unauthenticated, match="malformed"):
        keys.authenticate([("authorization", "Bearer ")])
    stranger = generate_key()
    with pytest.raises(Unauthenticated, match=r"^unknown API key$") as info:
        keys.authenticate(bearer(stranger))
    assert stranger not in str(info.value)
    with pytest.raises(Unauthenticated):
        keys.authenticate(bearer(hash_key(READ_KEY)))  # the stored hash is not a key


def test_lookup_compares_in_constant_time_against_every_entry(key_file: Path, monkeypatch: pytest.MonkeyPatch):
    keys = ApiKeys(key_file)
    calls: list[tuple[str, str]] = []

    def compare_digest(a: str, b: str) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth, "hmac", types.SimpleNamespace(compare_digest=compare_digest))
    assert keys.authenticate(bearer(READ_KEY)).name == "reader"  # the first entry matches...
    assert len(calls) == 4  # ...and every entry is still compared
    assert all(b == hash_key(READ_KEY) for _, b in calls)  # hashes only, never the key itself
    calls.clear()
    with pytest.raises(Unauthenticated):
        keys.authenticate(bearer(generate_key()))
    assert len(calls) == 4


# ------------------------------------------------------------------- authorize


def test_role_table_matches_the_service():
    from braid.v1 import braid_pb2 as pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Braid"].methods}
    assert set(ROLE_OF_METHOD) == methods
    assert {m for m, r in ROLE_OF_METHOD.items() if r is Role.READ} == {
        "GetCollection", "ListCollections", "ListAliases", "Get", "Count", "Search", "BatchSearch",
    }  # fmt: skip
    assert {m for m, r in ROLE_OF_METHOD.items() if r is Role.WRITE} == {
        "Upsert",
        "BulkUpsert",
        "UpsertStream",
        "Delete",
        "Flush",
    }
    assert {m for m, r in ROLE_OF_METHOD.items() if r is Role.ADMIN} == {
        "CreateCollection", "DeleteCollection", "CreateAlias", "UpdateAlias", "DeleteAlias",
        "CreateSnapshot", "ListSnapshots", "RestoreSnapshot", "DeleteSnapshot", "ExportSnapshot", "ImportSnapshot",
    }  # fmt: skip
    assert Role.READ < Role.WRITE < Role.ADMIN


@pytest.mark.parametrize("role", list(Role))
def test_each_role_includes_the_ones_below(key_file: Path, role: Role):
    keys = ApiKeys(key_file)
    principal = Principal("k", role, None)
    for method, needed in ROLE_OF_METHOD.items():
        if role >= needed:
            keys.authorize(principal, method, ["articles"])
        else:
            with pytest.raises(PermissionDenied) as info:
                keys.authorize(principal, method, ["articles"])
            message = str(info.value)
            assert "'k'" in message and method in message and f"needs role {needed.name.lower()}" in message


def test_unknown_methods_need_admin_and_full_paths_are_understood(key_file: Path):
    keys = ApiKeys(key_file)
    writer = Principal("w", Role.WRITE, None)
    with pytest.raises(PermissionDenied, match="Compact needs role admin"):
        keys.authorize(writer, "Compact", [])
    keys.authorize(Principal("a", Role.ADMIN, None), "Compact", [])
    keys.authorize(Principal("r", Role.READ, None), "/braid.v1.Braid/Search", ["x"])
    with pytest.raises(PermissionDenied):
        keys.authorize(Principal("r", Role.READ, None), "/braid.v1.Braid/Upsert", ["x"])


def test_scoped_keys_stay_in_their_collections(key_file: Path):
    keys = ApiKeys(key_file)
    scoped = keys.authenticate(bearer(SCOPED_KEY))
    keys.authorize(scoped, "Upsert", ["articles"])
    keys.authorize(scoped, "BatchSearch", ["articles", "news"])
    keys.authorize(scoped, "ListCollections", [])
    with pytest.raises(PermissionDenied) as info:
        keys.authorize(scoped, "BatchSearch", ["articles", "secrets"])
    assert "'articles-only'" in str(info.value) and "'secrets'" in str(info.value) and "BatchSearch" in str(info.value)
    assert SCOPED_KEY not in str(info.value)


def test_write_keys_create_only_the_jobs_system_collection(key_file: Path):
    keys = ApiKeys(key_file)
    writer, scoped = keys.authenticate(bearer(WRITE_KEY)), keys.authenticate(bearer(SCOPED_KEY))
    keys.authorize(writer, "CreateCollection", ["_braid_jobs"])
    for principal, method, names in (
        (writer, "CreateCollection", ["articles"]),
        (writer, "CreateCollection", ["_braid_jobs", "articles"]),
        (writer, "DeleteCollection", ["_braid_jobs"]),
        (scoped, "CreateCollection", ["_braid_jobs"]),  # out of its scope
        (keys.authenticate(bearer(READ_KEY)), "CreateCollection", ["_braid_jobs"]),
    ):
        with pytest.raises(PermissionDenied):
            keys.authorize(principal, method, names)


# ---------------------------------------------------------------------- reload


def test_stat_at_most_once_per_interval(key_file: Path, monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    keys = ApiKeys(key_file)
    stats = []
    real = auth._file_signature
    monkeypatch.setattr(auth, "_file_signature", lambda path: stats.append(path) or real(path))
    for _ in range(50):
        keys.authenticate(bearer(READ_KEY))
    assert stats == []
    now[0] += 1.0
    keys.authenticate(bearer(READ_KEY))
    keys.authenticate(bearer(READ_KEY))
    assert len(stats) == 1


def test_a_changed_file_replaces_the_keys(key_file: Path):
    keys = ApiKeys(key_file)
    keys.CHECK_INTERVAL_S = 0
    fresh = generate_key()
    write(key_file, [entry("reader", READ_KEY, "admin"), entry("fresh", fresh, "read")])
    assert keys.authenticate(bearer(fresh)).name == "fresh"
    assert keys.authenticate(bearer(READ_KEY)).role is Role.ADMIN
    with pytest.raises(Unauthenticated):
        keys.authenticate(bearer(WRITE_KEY))  # removed


def test_a_broken_file_keeps_the_old_keys_and_logs_once(key_file: Path, caplog: pytest.LogCaptureFixture):
    keys = ApiKeys(key_file)
    keys.CHECK_INTERVAL_S = 0
    caplog.set_level(logging.INFO, logger="braid.auth")
    write(key_file, [{"name": "oops", "hash": ADMIN_KEY, "role": "admin"}])
    for _ in range(5):
        assert keys.authenticate(bearer(READ_KEY)).name == "reader"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "keys[0] ('oops')" in errors[0].getMessage() and "keeping the 4 keys" in errors[0].getMessage()
    key_file.write_text("{")  # a second, different breakage is logged again
    keys.authenticate(bearer(READ_KEY))
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    key_file.unlink()  # a vanished file is a broken change too
    assert keys.authenticate(bearer(READ_KEY)).name == "reader"
    write(key_file, [entry("only", ADMIN_KEY, "admin")])
    assert keys.authenticate(bearer(ADMIN_KEY)).name == "only"
    with pytest.raises(Unauthenticated):
        keys.authenticate(bearer(READ_KEY))
    assert ADMIN_KEY not in caplog.text and READ_KEY not in caplog.text


# -------------------------------------------------------------------- braid keys


def test_cli_add_prints_the_key_once_and_stores_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "--file", str(path), "--name", "ingest", "--role", "write"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("braid_") and "\n" not in key
    assert "ingest" in err and key not in err
    assert key not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ApiKeys(path).authenticate(bearer(key)) == Principal("ingest", Role.WRITE, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]  # no temp file left behind

    argv = ["keys", "add", "--file", str(path), "--name", "scoped", "--role", "read"]
    assert main([*argv, "--collection", "news", "--collection", "articles"]) == 0
    scoped = capsys.readouterr().out.strip()
    assert ApiKeys(path).authenticate(bearer(scoped)).collections == frozenset({"articles", "news"})
    assert ApiKeys(path).authenticate(bearer(key)).name == "ingest"  # the earlier key is kept


def test_cli_refuses_a_duplicate_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "keys.json"
    argv = ["keys", "add", "--file", str(path), "--name", "ingest", "--role", "write"]
    assert main(argv) == 0
    before = path.read_text()
    capsys.readouterr()
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and "already has a key named 'ingest'" in err
    assert path.read_text() == before


def test_cli_list_shows_names_roles_and_scopes_never_hashes(key_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "list", "--file", str(key_file)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "role", "collections"]
    assert lines[1].split() == ["reader", "read", "all", "collections"]
    assert lines[4].split() == ["articles-only", "write", "articles,", "news"]
    assert "sha256" not in out and hash_key(READ_KEY)[7:] not in out


def test_cli_remove(key_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "remove", "--file", str(key_file), "--name", "ingest"]) == 0
    keys = ApiKeys(key_file)
    assert [p.name for p in keys.principals] == ["reader", "ops", "articles-only"]
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with pytest.raises(Unauthenticated):
        keys.authenticate(bearer(WRITE_KEY))
    capsys.readouterr()
    assert main(["keys", "remove", "--file", str(key_file), "--name", "ingest"]) == 1
    assert "no key named 'ingest'" in capsys.readouterr().err


def test_cli_reports_bad_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "keys.json"
    assert main(["keys", "list", "--file", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    path.write_text('{"keys": [{"name": "a", "hash": "x", "role": "read"}]}')
    assert main(["keys", "add", "--file", str(path), "--name", "b", "--role", "read"]) == 2  # never adds to a bad file
    assert "keys[0] ('a')" in capsys.readouterr().err
    assert main(["keys", "add", "--file", str(tmp_path / "no" / "dir.json"), "--name", "b", "--role", "read"]) == 1


def test_cli_file_defaults_to_braid_api_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "keys.json"
    monkeypatch.setenv("BRAID_API_KEYS", str(path))
    assert main(["keys", "add", "--name", "a", "--role", "admin"]) == 0
    assert [p.name for p in ApiKeys(path).principals] == ["a"]
