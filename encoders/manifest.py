"""``braid-model.json``: the manifest that makes a directory a Braid model.

A model directory holds the ONNX file(s), the tokenizer and this manifest:

    <models-dir>/<name>/
        braid-model.json   this file, written last (by atomic rename) so its presence means "complete"
        model.onnx         fp32 graph
        model.int8.onnx    optional int8 dynamically quantized graph
        tokenizer.json     Hugging Face tokenizers file

Manifest fields (JSON object, format 1):
    format        1
    name          model name, [a-z0-9][a-z0-9._-]{0,63}
    kind          "dense" | "sparse"
    output        graph output read: dense "last_hidden_state" (pooled here) or an already
                  pooled [batch, dim] output; sparse "splade" ([batch, vocab]) or "logits"
                  ([batch, seq, vocab], pooled here)
    pooling       dense only: "mean" | "cls"
    normalize     dense only: L2-normalize the pooled vector
    dim           dense: vector dimension; sparse: vocabulary size
    max_length    tokens per text after truncation (special tokens included)
    files         precision -> ONNX file name, e.g. {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    tokenizer     tokenizer file name
    sha256        file name -> hex digest of every file above (checked by ``braid models verify``)
    source        where the weights came from (free text)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidModel

MANIFEST_NAME = "braid-model.json"
FORMAT = 1
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
KINDS = ("dense", "sparse")
POOLINGS = ("mean", "cls")
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    kind: str
    output: str
    dim: int
    max_length: int
    files: dict[str, str]
    tokenizer: str = "tokenizer.json"
    pooling: str = "mean"
    normalize: bool = True
    sha256: dict[str, str] = field(default_factory=dict)
    source: str = ""
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, directory: Path) -> ModelManifest:
        path = directory / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
            manifest = cls(**raw)
        except (OSError, ValueError, TypeError) as err:
            raise InvalidModel(f"model directory {directory}: unreadable {MANIFEST_NAME}: {err}") from err
        manifest.check(directory)
        return manifest

    def check(self, directory: Path) -> None:
        problems = []
        if self.format != FORMAT:
            problems.append(f"format {self.format} (this Braid reads {FORMAT})")
        if not MODEL_NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r} must match {MODEL_NAME.pattern}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} not one of {KINDS}")
        if self.kind == "dense" and self.pooling not in POOLINGS:
            problems.append(f"pooling {self.pooling!r} not one of {POOLINGS}")
        if "fp32" not in self.files or not set(self.files) <= set(PRECISIONS):
            problems.append(f"files {self.files} must name an fp32 graph and only {PRECISIONS}")
        if self.dim < 1 or self.max_length < 2:
            problems.append(f"dim {self.dim} / max_length {self.max_length} out of range")
        if problems:
            raise InvalidModel(f"model directory {directory}: " + "; ".join(problems))

    def fingerprint(self, precision: str, digest_of: Callable[[str], str]) -> str:
        """A digest of everything that decides this model's output at ``precision``: the graph
        and tokenizer bytes (``digest_of(file name)`` -> sha256 hex) and the settings applied
        around them. Two copies of a model with one fingerprint give bit-identical vectors."""
        decides = {
            "kind": self.kind,
            "output": self.output,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "dim": self.dim,
            "max_length": self.max_length,
            "graph": digest_of(self.files[precision]),
            "tokenizer": digest_of(self.tokenizer),
        }
        return "sha256:" + hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST_NAME + ".tmp")
        with open(tmp, "w") as out:
            json.dump(self.to_json(), out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / MANIFEST_NAME)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
