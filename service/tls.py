"""TLS credentials for the server and the client, from PEM files, checked before gRPC sees them.

| side   | files                                  | result                                             |
|--------|----------------------------------------|----------------------------------------------------|
| server | cert chain + key                       | TLS; clients check the server against their CA     |
| server | cert chain + key + client CA bundle    | mutual TLS: a client without a cert from it fails  |
| client | CA (or none: the system roots)         | TLS; the server's certificate is verified          |
| client | CA + client cert + key                 | mutual TLS                                         |

gRPC only parses these files when a handshake happens, and then fails with a bare
"handshake failed" on one side. Here every file is read and parsed up front with the
standard library's ssl module (the key must belong to the certificate), so a bad path
or a wrong file stops ``braid serve`` with a ValueError naming the file instead.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def _read_pem(path: Path, what: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot read: {err.strerror or err}") from None
    # A key may be "PRIVATE KEY", "RSA PRIVATE KEY" or "EC PRIVATE KEY".
    if b"-----BEGIN " not in data or f"{marker}-----".encode() not in data:
        raise ValueError(f"{what} {path}: not a PEM file with a '{marker}' block")
    if marker == "PRIVATE KEY" and b"ENCRYPTED" in data:
        raise ValueError(f"{what} {path}: the private key is encrypted; gRPC needs an unencrypted PEM key")
    return data


def _no_password() -> bytes:
    # ssl.load_cert_chain would otherwise prompt on the terminal for an encrypted key.
    raise ValueError("encrypted private key")


def _check_pair(cert: Path, key: Path, purpose: int) -> None:
    context = ssl.SSLContext(purpose)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except (ssl.SSLError, ValueError) as err:
        raise ValueError(f"TLS key {key} does not fit certificate {cert}: {err}") from None


def _check_ca(ca: Path, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, ValueError) as err:
        raise ValueError(f"{what} {ca}: not a usable PEM CA bundle: {err}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with ``client_ca``, every client must present a certificate signed by it."""
    chain = _read_pem(cert, "TLS certificate", "CERTIFICATE")
    private_key = _read_pem(key, "TLS key", "PRIVATE KEY")
    _check_pair(cert, key, ssl.PROTOCOL_TLS_SERVER)
    roots = None
    if client_ca is not None:
        roots = _read_pem(client_ca, "TLS client CA", "CERTIFICATE")
        _check_ca(client_ca, "TLS client CA")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust ``ca`` (default: the system roots); ``cert`` + ``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a TLS client certificate and its key must be given together")
    roots = None
    if ca is not None:
        roots = _read_pem(ca, "TLS CA", "CERTIFICATE")
        _check_ca(ca, "TLS CA")
    chain = private_key = None
    if cert is not None and key is not None:
        chain = _read_pem(cert, "TLS client certificate", "CERTIFICATE")
        private_key = _read_pem(key, "TLS client key", "PRIVATE KEY")
        _check_pair(cert, key, ssl.PROTOCOL_TLS_CLIENT)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key, certificate_chain=chain)
