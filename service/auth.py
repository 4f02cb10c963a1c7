"""API keys: who is calling (authenticate) and what that caller may do (authorize).

A client sends its key on every call as the metadata ``authorization: Bearer <key>``.
The server holds only SHA-256 hashes of the keys, in a JSON file (``--api-keys``,
BRAID_API_KEYS) that ``braid keys add|list|remove`` writes:

    {"keys": [
      {"name": "search-frontend", "hash": "sha256:<64 hex>", "role": "read"},
      {"name": "ingest", "hash": "sha256:<64 hex>", "role": "write", "collections": ["articles"]}
    ]}

| field       | meaning                                                                   |
|-------------|---------------------------------------------------------------------------|
| name        | unique label; shows up in logs and in PERMISSION_DENIED messages         |
| hash        | ``sha256:`` + hex SHA-256 of the key's UTF-8 bytes (``hash_key``)         |
| role        | ``read``, ``write`` or ``admin``                                          |
| collections | optional, non-empty: the only collections the key may touch (else all)   |

Roles are ordered, each including the ones below it:

| role  | methods                                                                     |
|-------|-----------------------------------------------------------------------------|
| read  | GetCollection, ListCollections, ListAliases, Get, Count, Search, BatchSearch |
| write | read + Upsert, BulkUpsert, UpsertStream, Delete, Flush                      |
| admin | write + CreateCollection, DeleteCollection, CreateAlias, UpdateAlias,       |
|       | DeleteAlias, CreateSnapshot, ListSnapshots, RestoreSnapshot,                |
|       | DeleteSnapshot, ExportSnapshot, ImportSnapshot (and any method not named)   |

One exception: creating the system collection ``_braid_jobs`` (the bulk jobs' checkpoints,
docs/jobs.md) needs only ``write`` on it, so a job's least-privilege key can run the first job
on a fresh server; deleting it still needs ``admin``.

A scoped key (``collections``) gets PERMISSION_DENIED for any other collection, and
ListCollections shows it only its own. Names are checked as the request gives them: an
alias is a name of its own (a key scoped to the alias may use it, whatever it points at),
CreateAlias and UpdateAlias need both ``name`` and ``collection`` in scope, and ListAliases
shows a scoped key the aliases whose name or collection is in its scope. A snapshot belongs
to the collection it was taken of: a scoped admin key lists, restores, deletes, exports and
imports only its collections' snapshots, and RestoreSnapshot's target ``name`` must be in
scope too. The file is
checked for changes at most once a second: a valid new file replaces every key at once; a
broken one is logged (once per change) and the old keys stay in force. Keys never appear
in messages or logs.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braid.index.errors import PermissionDenied, Unauthenticated

log = logging.getLogger("braid.auth")

HASH_PREFIX = "sha256:"
KEY_PREFIX = "braid_"
SERVICE_PREFIX = "/braid.v1.Braid/"
_ENTRY_FIELDS = ("name", "hash", "role", "collections")


class Role(enum.IntEnum):
    """What a key may do; a higher role includes every lower one."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ROLES = {role.label: role for role in Role}

ROLE_OF_METHOD: dict[str, Role] = {
    "GetCollection": Role.READ,
    "ListCollections": Role.READ,
    "Get": Role.READ,
    "Count": Role.READ,
    "Search": Role.READ,
    "BatchSearch": Role.READ,
    "Upsert": Role.WRITE,
    "BulkUpsert": Role.WRITE,
    "UpsertStream": Role.WRITE,
    "Delete": Role.WRITE,
    "Flush": Role.WRITE,
    "CreateCollection": Role.ADMIN,
    "DeleteCollection": Role.ADMIN,
    "ListAliases": Role.READ,
    "CreateAlias": Role.ADMIN,
    "UpdateAlias": Role.ADMIN,
    "DeleteAlias": Role.ADMIN,
    # Snapshots hold whole collections: listing them shows names and sizes, restoring one makes
    # a collection, exporting one reads every document.
    "CreateSnapshot": Role.ADMIN,
    "ListSnapshots": Role.ADMIN,
    "RestoreSnapshot": Role.ADMIN,
    "DeleteSnapshot": Role.ADMIN,
    "ExportSnapshot": Role.ADMIN,
    "ImportSnapshot": Role.ADMIN,
}


# Collections a write key may create (in scope): system collections whose schema the client fixes.
WRITER_CREATES = frozenset({"_braid_jobs"})


def role_needed(method: str) -> Role:
    """The role a braid.v1.Braid method needs: a short name or a full ``/braid.v1.Braid/X`` path.

    Anything not in ROLE_OF_METHOD (a method added later, another service) needs ADMIN.
    """
    if method.startswith(SERVICE_PREFIX):
        method = method[len(SERVICE_PREFIX) :]
    return ROLE_OF_METHOD.get(method, Role.ADMIN)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: the key's name, role and collection scope (None = every collection)."""

    name: str
    role: Role
    collections: frozenset[str] | None = None

    def allows(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    @property
    def scope(self) -> str:
        return "all collections" if self.collections is None else ", ".join(sorted(self.collections))


def generate_key() -> str:
    """A new random key: 256 bits from the OS CSPRNG, URL-safe so it fits a header and a shell."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of the key.

    A fast, unsalted hash is right here, unlike for passwords: a key is 256 random bits,
    so nothing can be guessed from the hash faster than brute force over 2**256, and a
    slow KDF (bcrypt, argon2) would only cost CPU on every call. It also lets the lookup
    hash the presented key once and compare it against every entry in constant time.
    """
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ key file


def _entry_error(path: Path, index: int, entry: Any, problem: str) -> ValueError:
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"keys[{index}] ({name!r})" if isinstance(name, str) and name else f"keys[{index}]"
    return ValueError(f"API key file {path}: {label}: {problem}")


def _parse_entry(path: Path, index: int, entry: Any) -> tuple[str, Principal]:
    """One validated entry as (hash, principal). Errors never echo the hash field: an operator
    who pasted a raw key there by mistake must not find it in a log."""
    if not isinstance(entry, dict):
        raise _entry_error(path, index, entry, f"must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
    if unknown:
        raise _entry_error(path, index, entry, f"unknown field(s) {unknown}; valid: {', '.join(_ENTRY_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _entry_error(path, index, entry, "name must be a non-empty string")
    digest = entry.get("hash")
    hex_part = digest[len(HASH_PREFIX) :] if isinstance(digest, str) and digest.startswith(HASH_PREFIX) else ""
    if len(hex_part) != 64 or any(c not in "0123456789abcdef" for c in hex_part):
        raise _entry_error(
            path, index, entry, "hash must be 'sha256:' and 64 lowercase hex digits (see braid keys add)"
        )
    role = entry.get("role")
    if role not in ROLES:
        raise _entry_error(path, index, entry, f"role must be one of {', '.join(ROLES)}, got {role!r}")
    collections = entry.get("collections")
    if collections is not None:
        if (
            not isinstance(collections, list)
            or not collections
            or not all(isinstance(c, str) and c for c in collections)
        ):
            raise _entry_error(
                path, index, entry, "collections must be a non-empty list of names (leave it out for all collections)"
            )
        collections = frozenset(collections)
    return digest, Principal(name, ROLES[role], collections)


def _read_raw(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"API key file {path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"API key file {path}: not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"API key file {path}: not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'API key file {path}: expected an object {{"keys": [...]}}')
    return document["keys"]


def load_keys(path: Path) -> tuple[tuple[str, Principal], ...]:
    """Every entry of the file as (hash, principal); ValueError names the file and the bad entry."""
    entries: list[tuple[str, Principal]] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for index, raw in enumerate(_read_raw(path)):
        digest, principal = _parse_entry(path, index, raw)
        if principal.name in names:
            raise _entry_error(path, index, raw, "duplicate name")
        if digest in hashes:
            raise _entry_error(path, index, raw, "same hash as an earlier entry (one key, two names)")
        names.add(principal.name)
        hashes.add(digest)
        entries.append((digest, principal))
    return tuple(entries)


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is replaced or edited. os.stat follows symlinks, so a
    Kubernetes Secret update (an atomic swap of the ..data symlink) changes the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ApiKeys:
    """The keys of one file, reloaded when the file changes; safe to use from many threads."""

    CHECK_INTERVAL_S = 1.0  # the file is stat-ed at most this often

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._signature = _file_signature(self.path)
        self._entries = load_keys(self.path)  # replaced whole, never mutated: readers need no lock
        self._checked = time.monotonic()
        self._failed_signature: tuple[int, int, int, int] | None = None
        self._reloading = threading.Lock()

    @property
    def principals(self) -> tuple[Principal, ...]:
        return tuple(principal for _, principal in self._entries)

    def authenticate(self, metadata: Iterable[tuple[str, Any]]) -> Principal:
        """The principal of the ``authorization: Bearer <key>`` metadata; Unauthenticated if absent or unknown."""
        self.reload_if_changed()
        key = _bearer_key(metadata)
        presented = hash_key(key)
        found: Principal | None = None
        for digest, principal in self._entries:
            # Compare against every entry, whether or not one matched already, with a
            # constant-time comparison: the time taken says nothing about any stored hash.
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    def authorize(self, principal: Principal, method: str, collections: Iterable[str]) -> None:
        """PermissionDenied unless the principal's role covers ``method`` and its scope every collection."""
        needed = role_needed(method)
        short = method.rsplit("/", 1)[-1]
        collections = list(collections)
        if short == "CreateCollection" and collections and set(collections) <= WRITER_CREATES:
            needed = Role.WRITE
        if principal.role < needed:
            raise PermissionDenied(
                f"API key {principal.name!r} has role {principal.role.label}; {short} needs role {needed.label}"
            )
        for collection in collections:
            if not principal.allows(collection):
                raise PermissionDenied(
                    f"API key {principal.name!r} may not use collection {collection!r} in {short}; "
                    f"its collections: {principal.scope}"
                )

    def reload_if_changed(self) -> None:
        """Stat the file (at most once per CHECK_INTERVAL_S) and load it again if it changed."""
        now = time.monotonic()
        if now - self._checked < self.CHECK_INTERVAL_S:
            return
        if not self._reloading.acquire(blocking=False):
            return  # another thread is checking: use the current keys
        try:
            self._checked = now
            signature = _file_signature(self.path)
            if signature == self._signature:
                return
            try:
                entries = load_keys(self.path)
            except ValueError as err:
                if signature != self._failed_signature:
                    self._failed_signature = signature
                    log.error("%s; keeping the %d keys loaded before", err, len(self._entries))
                return
            self._entries, self._signature, self._failed_signature = entries, signature, None
            log.info("API key file %s reloaded: %d keys", self.path, len(entries))
        finally:
            self._reloading.release()


def _bearer_key(metadata: Iterable[tuple[str, Any]]) -> str:
    """The key of the first ``authorization`` entry (gRPC lower-cases metadata keys)."""
    for name, value in metadata:
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, key = str(value).strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization metadata: send 'authorization: Bearer <key>'")
        return key.strip()
    raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")


# ----------------------------------------------------------- braid keys CLI


def write_keys_file(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the file atomically (temp file, fsync, rename, fsync the folder), mode 0600."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"keys": entries}, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keys_add(args: argparse.Namespace) -> int:
    path = Path(args.file)
    entries: list[Any] = []
    if path.exists():
        load_keys(path)  # refuse to add to a broken file
        entries = _read_raw(path)
    if any(isinstance(e, dict) and e.get("name") == args.name for e in entries):
        print(f"braid keys add: {path} already has a key named {args.name!r}", file=sys.stderr)
        return 1
    key = generate_key()
    entry: dict[str, Any] = {"name": args.name, "hash": hash_key(key), "role": args.role}
    if args.collection:
        entry["collections"] = sorted(set(args.collection))
    write_keys_file(path, [*entries, entry])
    scope = ", ".join(entry.get("collections", ["all collections"]))
    print(f"added key {args.name!r} (role {args.role}, {scope}) to {path}; it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    principals = [principal for _, principal in load_keys(Path(args.file))]
    width = max([len("name"), *(len(p.name) for p in principals)])
    print(f"{'name':<{width}}  {'role':<5}  collections")
    for p in principals:
        print(f"{p.name:<{width}}  {p.role.label:<5}  {p.scope}")
    return 0


def _keys_remove(args: argparse.Namespace) -> int:
    path = Path(args.file)
    load_keys(path)
    entries = _read_raw(path)
    kept = [e for e in entries if e.get("name") != args.name]
    if len(kept) == len(entries):
        names = ", ".join(e["name"] for e in entries) or "none"
        print(f"braid keys remove: no key named {args.name!r} in {path}; its keys: {names}", file=sys.stderr)
        return 1
    write_keys_file(path, kept)
    print(f"removed key {args.name!r} from {path}", file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    run = {"add": _keys_add, "list": _keys_list, "remove": _keys_remove}[args.action]
    try:
        return run(args)
    except ValueError as err:
        print(f"braid keys {args.action}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"braid keys {args.action}: {args.file}: {err.strerror or err}", file=sys.stderr)
        return 1


def add_keys_command(commands: Any) -> None:
    """Register ``braid keys add|list|remove`` on the argparse subparsers object."""
    keys = commands.add_parser("keys", help="manage the API key file (--api-keys of braid serve)")
    actions = keys.add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--file",
        default=os.environ.get("BRAID_API_KEYS"),
        required="BRAID_API_KEYS" not in os.environ,
        help="the key file (BRAID_API_KEYS)",
    )
    add = actions.add_parser("add", parents=[where], help="make a key, store its hash, print the key once")
    add.add_argument("--name", required=True, help="unique label, shown in logs and errors")
    add.add_argument("--role", required=True, choices=list(ROLES))
    add.add_argument("--collection", action="append", default=[], help="limit the key to this collection (repeatable)")
    actions.add_parser("list", parents=[where], help="names, roles and collections (never hashes)")
    remove = actions.add_parser("remove", parents=[where], help="delete a key by name")
    remove.add_argument("--name", required=True)
    keys.set_defaults(run=_keys)
