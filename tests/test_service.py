"""The server's face: health, reflection, the CLI, and configuration from flags and BRAID_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from braid.service.config import load_config

from .conftest import schema


def test_health_is_serving(braid):
    with grpc.insecure_channel(f"127.0.0.1:{braid.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "braid.v1.Braid"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(braid):
    with grpc.insecure_channel(f"127.0.0.1:{braid.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"braid.v1.Braid", "grpc.health.v1.Health"} <= names


def test_config_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAID_PORT", "6000")
    monkeypatch.setenv("BRAID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BRAID_HOST", "0.0.0.0")
    config = load_config(port=7000, host=None)
    assert (config.port, config.host, config.data_dir) == (7000, "0.0.0.0", tmp_path)
    monkeypatch.setenv("BRAID_WORKERS", "many")
    with pytest.raises(ValueError, match="workers"):
        load_config()


def test_cli_manages_ingests_and_searches(child_server, tmp_path):
    server = child_server()
    address = f"127.0.0.1:{server.port}"
    schema_file = tmp_path / "schema.json"
    from google.protobuf import json_format

    schema_file.write_text(json_format.MessageToJson(schema(dim=2, sparse=False)))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"d{i}",
                    "text": {"title": f"title {i}", "body": "tea" if i == 3 else "coffee"},
                    # metadata as a JSON object, or (as the protobuf JSON mapping has it) its text
                    **({"metadata": {"page": i, "loc": {"p": [i]}}} if i % 2 else {"metadata": f'{{"n": {i}}}'}),
                }
            )
            for i in range(10)
        )
    )

    def braid(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "braid.service.cli", *args, "--address", address]
            if args[0] != "collection"
            else [sys.executable, "-m", "braid.service.cli", *args[:2], "--address", address, *args[2:]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "created collection" in braid("collection", "create", "cli", "--schema", str(schema_file))
    assert "upserted 10 documents" in braid("ingest", "cli", str(docs), "--batch", "4")
    stored = {d.id: d.metadata for d in server.client.get("cli", ["d1", "d2"])}
    assert stored == {"d1": '{"page":1,"loc":{"p":[1]}}', "d2": '{"n":2}'}
    assert "cli" in braid("collection", "list")
    assert '"documents": "10"' in braid("collection", "describe", "cli")
    out = braid("search", "cli", "--text", "tea", "--show", "body")
    assert "d3" in out and "tea" in out
    failed = subprocess.run(
        [sys.executable, "-m", "braid.service.cli", "collection", "describe", "--address", address, "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "NOT_FOUND" in failed.stderr
    server.stop()


def test_braid_serve_fixes_the_malloc_settings_that_keep_freed_index_memory_resident() -> None:
    """service/memory.py: on glibc, mallopt takes both settings (a child, so this process keeps its
    own); an operator's MALLOC_* variable is left to glibc."""
    code = "from braid.service.memory import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out
    env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out
