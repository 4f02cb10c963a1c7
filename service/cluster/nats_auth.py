"""How Braid authenticates to NATS: credentials files, nkey seeds and TLS (nats_creds, nats_tls_*).

This module owns what a NATS client of Braid presents and checks, and nothing of the connection
itself (service/cluster/nats_link.py connects):

* :func:`read_creds`: what ``nats_creds`` (BRAID_NATS_CREDS) holds, told apart by content: a
  ``.creds`` file (a user JWT and its nkey seed, between ``-----BEGIN ...-----`` lines; nats-py's
  ``user_credentials``) or a bare user nkey seed (``SU...``; nats-py's ``nkeys_seed``, for a
  server whose ``authorization { users = [ { nkey: U... } ] }`` lists its public key). An
  unreadable or unrecognised file is refused with a ValueError naming the setting, so
  ``braid serve`` exits 2 at start instead of retrying a connection NATS will never accept.
* :class:`NatsSecurity`: the checked settings, and the keyword arguments for ``nats.connect``
  (an ``ssl.SSLContext`` that verifies the server against ``nats_tls_ca`` and presents
  ``nats_tls_cert``/``nats_tls_key`` when set; ``tls_hostname`` from ``nats_tls_server_name``,
  the name the servers' certificate carries when it is not each URL's host).
* :func:`new_user_seed` / :func:`write_user_seed`: a fresh user nkey (``braid cluster nkey``).

nats-py re-reads the file each time it signs a server's nonce, so a rotated file is used at the
next (re)connection. It imports nothing heavy: config validation calls :func:`read_creds`.
"""

from __future__ import annotations

import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CREDS_SETTING = "nats_creds (BRAID_NATS_CREDS)"
_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
_SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
_MAX_CREDS_BYTES = 64 * 1024  # a .creds file is a few KB; anything larger is not one

CredsKind = Literal["creds", "seed"]


def _check_seed(seed: str, where: str) -> str:
    """The user public key ("U...") of an nkey seed; ValueError when it is not a user seed."""
    import nkeys

    if not seed.startswith("SU"):
        kind = "an nkey seed of another kind (not a user's: SU...)" if seed.startswith("S") else "no nkey seed"
        raise ValueError(f"{CREDS_SETTING}: {where} holds {kind}")
    try:
        prefix, raw = nkeys.decode_seed(bytearray(seed.encode()))
        # decode_seed checks neither the length nor the checksum: a seed that does not encode
        # back to itself is a typo or a truncated copy, which NATS would refuse at every connect
        if len(raw) != 32 or nkeys.encode_seed(bytes(raw), prefix).decode() != seed:
            raise nkeys.ErrInvalidSeed()
        pair = nkeys.from_seed(bytearray(seed.encode()))
    except Exception as err:  # nkeys' errors carry no message: say what is wrong
        raise ValueError(f"{CREDS_SETTING}: {where} holds a malformed nkey seed ({type(err).__name__})") from None
    public = pair.public_key.decode()
    pair.wipe()
    return public


def read_creds(path: Path) -> tuple[CredsKind, str]:
    """What the credentials file at ``path`` is ("creds" or "seed") and its user public key.

    ValueError naming BRAID_NATS_CREDS when it cannot be read or is neither a ``.creds`` file with
    a JWT and a user seed nor a bare user nkey seed."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CREDS_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{CREDS_SETTING}: cannot read {where}: {err.strerror or err}") from None
    if len(raw) > _MAX_CREDS_BYTES:
        raise ValueError(f"{CREDS_SETTING}: {where} is over {_MAX_CREDS_BYTES} bytes: not a credentials file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{CREDS_SETTING}: {where} is not text: not a .creds file nor an nkey seed") from None
    lines = [line.strip() for line in text.splitlines()]
    if _JWT_BEGIN in lines or _SEED_BEGIN in lines:
        # nats-py takes the line after each BEGIN marker (and loops for ever looking for the JWT's)
        if _JWT_BEGIN not in lines or _SEED_BEGIN not in lines:
            missing = "user JWT" if _JWT_BEGIN not in lines else "user nkey seed"
            raise ValueError(f"{CREDS_SETTING}: {where} looks like a .creds file but has no {missing}")
        jwt = lines[lines.index(_JWT_BEGIN) + 1] if lines.index(_JWT_BEGIN) + 1 < len(lines) else ""
        seed = lines[lines.index(_SEED_BEGIN) + 1] if lines.index(_SEED_BEGIN) + 1 < len(lines) else ""
        if jwt.count(".") != 2:
            raise ValueError(f"{CREDS_SETTING}: {where}: the line after {_JWT_BEGIN} is not a JWT")
        return "creds", _check_seed(seed, where)
    words = text.split()
    if len(words) != 1:
        raise ValueError(f"{CREDS_SETTING}: {where} is neither a .creds file (JWT and seed) nor a bare nkey seed")
    return "seed", _check_seed(words[0], where)


def _tls_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client context that verifies the NATS server against ``ca`` (and its host name), and
    presents ``cert``/``key`` when given; ValueError naming the setting whose file is bad."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"nats_tls_ca (BRAID_NATS_TLS_CA): cannot load {ca}: {err}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as err:
            raise ValueError(
                f"nats_tls_cert / nats_tls_key (BRAID_NATS_TLS_CERT / _KEY): cannot load {cert} and {key}: {err}"
            ) from None
    return context


@dataclass(frozen=True)
class NatsSecurity:
    """What a Braid NATS client presents: credentials (``creds``, of ``creds_kind``) and TLS
    (``tls_server_name``: the name to check the servers' certificate against; "" each URL's host)."""

    creds: Path | None = None
    creds_kind: CredsKind | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""

    @classmethod
    def of(
        cls,
        creds: Path | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_server_name: str = "",
    ) -> NatsSecurity:
        """Checked settings: the credentials file read once (its kind), the TLS files loadable."""
        kind = read_creds(creds)[0] if creds is not None else None
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key must be given together")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("nats_tls_cert (a client certificate for NATS) needs nats_tls_ca")
        if tls_server_name and tls_ca is None:
            raise ValueError("nats_tls_server_name (BRAID_NATS_TLS_SERVER_NAME) needs nats_tls_ca")
        security = cls(creds, kind, tls_ca, tls_cert, tls_key, tls_server_name)
        security.connect_options()  # a bad TLS file is refused now, not at the first connection
        return security

    @classmethod
    def from_config(cls, config: Any) -> NatsSecurity:
        """From a ServerConfig's nats_creds and nats_tls_* (duck-typed: config imports this module)."""
        return cls.of(
            config.nats_creds,
            config.nats_tls_ca,
            config.nats_tls_cert,
            config.nats_tls_key,
            config.nats_tls_server_name,
        )

    @property
    def enabled(self) -> bool:
        return self.creds is not None or self.tls_ca is not None

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {}
        if self.creds is not None:
            options["user_credentials" if self.creds_kind == "creds" else "nkeys_seed"] = str(self.creds)
        if self.tls_ca is not None:
            options["tls"] = _tls_context(self.tls_ca, self.tls_cert, self.tls_key)
            if self.tls_server_name:
                options["tls_hostname"] = self.tls_server_name
        return options


# ---------------------------------------------------------------------- making keys


def new_user_seed() -> tuple[bytes, str]:
    """A new user nkey: (its seed, "SU..."; its public key, "U...") from 32 random bytes."""
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    public = pair.public_key.decode()
    pair.wipe()
    return bytes(seed), public


def write_user_seed(path: Path, force: bool = False) -> str:
    """Write a new user nkey seed to ``path`` (mode 0600, created so: never readable by others,
    not even for a moment) and return its public key. FileExistsError unless ``force``."""
    seed, public = new_user_seed()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file overwritten with force keeps no wider mode
        os.write(fd, seed + b"\n")
    finally:
        os.close(fd)
    return public
