"""The wire contract stays wired: every request field is read by the service, and the
generated code matches proto/ (the install step regenerates it)."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf.descriptor import Descriptor

from braid.v1 import braid_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
SERVICE_SOURCES = [ROOT / "service" / name for name in ("convert.py", "rpcs.py", "handlers.py", "encoding.py")]


def _request_fields(message: Descriptor, seen: set[str]) -> set[tuple[str, str]]:
    """(message, field) for every field reachable from a request message."""
    if message.full_name in seen:
        return set()
    seen.add(message.full_name)
    fields = set()
    for field in message.fields:
        fields.add((message.name, field.name))
        if field.message_type is not None and field.message_type.file is pb.DESCRIPTOR:
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"].message_type
                if value is not None and value.file is pb.DESCRIPTOR:
                    fields |= _request_fields(value, seen)
            else:
                fields |= _request_fields(field.message_type, seen)
    return fields


def test_every_request_field_is_read_by_the_service():
    source = "\n".join(path.read_text() for path in SERVICE_SOURCES)
    seen: set[str] = set()
    fields = set()
    for method in pb.DESCRIPTOR.services_by_name["Braid"].methods:
        fields |= _request_fields(method.input_type, seen)
    unread = sorted(
        f"{message}.{name}" for message, name in fields if not re.search(rf"\.{name}\b|\"{name}\"|\b{name}=", source)
    )
    assert not unread, f"request fields the service never reads: {unread}"
    assert len(fields) > 60


def test_generated_code_matches_the_proto():
    proto = (ROOT / "proto" / "braid" / "v1" / "braid.proto").read_text()
    declared = set(re.findall(r"^message (\w+)", proto, flags=re.MULTILINE))
    assert declared == set(pb.DESCRIPTOR.message_types_by_name)
    rpcs = set(re.findall(r"^\s*rpc (\w+)\(", proto, flags=re.MULTILINE))
    assert rpcs == {m.name for m in pb.DESCRIPTOR.services_by_name["Braid"].methods}
