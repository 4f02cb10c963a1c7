"""Collection aliases of a standalone data directory: the table in memory and its one file.

An alias is a second name for a collection, following the collection-name rule
([a-z0-9_-]{1,64}) and never equal to a collection's name. The catalog (index/catalog.py)
resolves it wherever a collection name is taken, keeps alias and collection names disjoint,
refuses an alias of an alias, and refuses to delete a collection that has aliases. This
module owns the table and its durability; the catalog's lock serialises every change.

File ``<data_dir>/aliases.json``, a JSON manifest (index/manifest.py): UTF-8 JSON text,
keys sorted, ``indent=1``, one trailing newline, its CRC embedded::

    {
     "aliases": {
      "<alias>": "<collection>",
      ...
     },
     "crc32": <zlib.crc32 of the canonical JSON of this object without "crc32">,
     "format": 1
    }

No file means no aliases. Every change writes the whole table (tens of bytes an alias) with
``write_json_atomic``: ``aliases.json.tmp`` written and fsynced, renamed onto
``aliases.json``, the directory fsynced; only then does the table in memory change and the
call answer. So an acknowledged change survives kill -9, and a crash leaves the old or the
new table, never a mix (a leftover ``.tmp`` is ignored and overwritten by the next change).
Readers never lock: the dict is replaced whole, so one lookup sees one version of it.

Damage: the CRC covers every alias and target, and a flipped byte anywhere else (a key, a
quote, the layout) leaves the file unparsable or its checksum mismatched, so damage is
found when the file is read at startup. The table is then *quarantined*, as the catalog
quarantines a collection that fails to open: the server starts and collections serve by
their own names, but everything that needs the aliases answers DATA_LOSS naming the file:
a name that is not a collection (it may be an alias), every alias call, CreateCollection
and DeleteCollection (they must check aliases). CollectionInfo.aliases is empty meanwhile.
The damaged file is never overwritten. To repair it, stop the server, restore
``aliases.json`` from a backup or remove it (its content is readable JSON: note the
aliases), start the server, and create the aliases again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .diskspace import is_disk_full
from .errors import DataLoss, DiskFull, InvalidArgument
from .manifest import read_json, write_json_atomic
from .schema import NAME_PATTERN

log = logging.getLogger("braid.aliases")

FILE_NAME = "aliases.json"
FORMAT_VERSION = 1


def check_name(value: str, field: str) -> None:
    """InvalidArgument naming ``field`` unless ``value`` is a valid collection (or alias) name."""
    if not NAME_PATTERN.fullmatch(value or ""):
        raise InvalidArgument.field(field, f"{value!r} must match {NAME_PATTERN.pattern} (a collection or alias name)")


class AliasTable:
    """Alias -> collection name, backed by ``aliases.json``; writers hold the catalog's lock."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._targets: dict[str, str] = {}
        self.problem: DataLoss | None = None  # set when the file is damaged: the table is quarantined

    def load(self) -> None:
        """Read the file (at startup). A damaged file quarantines the table; it never raises."""
        try:
            self._targets = _parse(self.path, read_json(self.path, require_checksum=True))
            self.problem = None
        except DataLoss as err:
            self._targets = {}
            self.problem = DataLoss(
                f"aliases are unavailable: {err}; until {self.path.name} is restored from a backup or removed "
                f"(server stopped; then create the aliases again), names that are not collections cannot be "
                f"resolved and aliases, collections' creation and deletion are refused"
            )
            log.error("%s", self.problem)

    def check(self) -> None:
        """DataLoss while the file is damaged."""
        if self.problem is not None:
            raise DataLoss(str(self.problem))

    def target(self, name: str) -> str | None:
        """The collection alias ``name`` points at, None when it is no alias; DataLoss while damaged."""
        self.check()
        return self._targets.get(name)

    def peek(self, name: str) -> str | None:
        """``target`` that never raises (None while damaged), for cheap routing decisions."""
        return self._targets.get(name)

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases pointing at ``collection``, sorted (none while damaged)."""
        return sorted(alias for alias, target in self._targets.items() if target == collection)

    def items(self) -> list[tuple[str, str]]:
        """Every (alias, collection), sorted by alias; DataLoss while damaged."""
        self.check()
        return sorted(self._targets.items())

    def set(self, name: str, collection: str) -> None:
        """Create or move alias ``name``; durable when it returns."""
        self.check()
        self._publish({**self._targets, name: collection})

    def remove(self, name: str) -> None:
        self.check()
        self._publish({alias: target for alias, target in self._targets.items() if alias != name})

    def _publish(self, targets: dict[str, str]) -> None:
        try:
            write_json_atomic(self.path, {"format": FORMAT_VERSION, "aliases": targets})
        except OSError as err:
            if is_disk_full(err):
                raise DiskFull(f"disk full: cannot write {self.path}: {err}") from err
            raise
        self._targets = targets  # after the file: nothing unacknowledged is ever visible


def _parse(path: Path, meta: dict | None) -> dict[str, str]:
    if meta is None:
        return {}
    aliases = meta.get("aliases")
    if meta.get("format") != FORMAT_VERSION or not isinstance(aliases, dict):
        raise DataLoss(f"{path}: unsupported alias table (format {meta.get('format')!r})")
    for alias, target in aliases.items():
        valid = isinstance(target, str) and NAME_PATTERN.fullmatch(alias) and NAME_PATTERN.fullmatch(target)
        if not valid or alias == target:
            raise DataLoss(f"{path}: malformed alias entry {alias!r}: {target!r}")
    return dict(aliases)
