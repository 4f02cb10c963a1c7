"""Build hook: generate the braid.v1 protobuf/gRPC modules from proto/ at install time.

Runs for wheels and for editable installs alike, so the generated code always
matches the .proto files that ship with the source (it is never committed).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_protos() -> None:
    from grpc_tools import protoc  # build-time requirement (pyproject build-system.requires)

    include = str(Path(protoc.__file__).parent / "_proto")
    # Only braid's own protos: proto/grpc/health/v1/health.proto ships for non-Python clients,
    # and grpcio-health-checking already provides its Python code (grpc_health.v1).
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "braid").rglob("*.proto"))
    args = ["protoc", "-Iproto", f"-I{include}", "--python_out=proto", "--pyi_out=proto", "--grpc_python_out=proto"]
    if protoc.main(args + protos) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
