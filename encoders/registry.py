"""The models directory: which models exist, and loaded encoders for them.

``ModelStore`` lists built-in and exported models, loads an encoder per
(model, precision) once and shares it, and verifies exports. A model is
*exported* when ``<models-dir>/<name>/braid-model.json`` exists (it is written
last); a built-in model that is not exported yet is reported with the command
that exports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dense import DenseEncoder
from .errors import InvalidModel, ModelNotExported, UnknownModel
from .export import BUILTIN_MODELS
from .manifest import MANIFEST_NAME, MODEL_NAME, PRECISIONS, ModelManifest, sha256_of
from .runtime import open_session
from .sparse import SpladeEncoder
from .tokenize import TextTokenizer

VERIFY_TEXTS = [
    "Braid braids sparse and dense retrieval.",
    "",
    "Wie schnell ist die Suche? 検索はどのくらい速いですか?",
    "a " * 400,
]


@dataclass(frozen=True)
class ModelStatus:
    name: str
    kind: str
    exported: bool
    builtin: bool
    precisions: tuple[str, ...]
    dim: int | None
    description: str


class ModelStore:
    def __init__(self, models_dir: Path, threads: int | None = None, batch_size: int = 8) -> None:
        self.models_dir = Path(models_dir)
        self.threads = threads
        self.batch_size = batch_size
        self._loaded: dict[tuple[str, str], DenseEncoder | SpladeEncoder] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def export_command(self, name: str) -> str:
        return f"braid models export {name} --models-dir {self.models_dir}"

    def manifest(self, name: str) -> ModelManifest:
        # A name is a directory name only when it is a valid model name: never a path, never too long.
        directory = self.models_dir / name if MODEL_NAME.fullmatch(name) else None
        if directory is not None and (directory / MANIFEST_NAME).is_file():
            return ModelManifest.read(directory)
        if name in BUILTIN_MODELS:
            raise ModelNotExported(
                f"model {name!r} is not exported in {self.models_dir}; run `{self.export_command(name)}`"
            )
        known = sorted({*BUILTIN_MODELS, *(s.name for s in self.list())})
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(known)}")

    def list(self) -> list[ModelStatus]:
        statuses: dict[str, ModelStatus] = {}
        if self.models_dir.is_dir():
            for directory in sorted(self.models_dir.iterdir()):
                if directory.name.startswith(".") or not (directory / MANIFEST_NAME).is_file():
                    continue
                try:
                    m = ModelManifest.read(directory)
                except InvalidModel:
                    continue
                builtin = BUILTIN_MODELS.get(m.name)
                statuses[m.name] = ModelStatus(
                    m.name, m.kind, True, builtin is not None, tuple(m.files), m.dim,
                    builtin.description if builtin else m.source,
                )  # fmt: skip
        for name, model in BUILTIN_MODELS.items():
            if name not in statuses:
                statuses[name] = ModelStatus(name, model.kind, False, True, (), None, model.description)
        return [statuses[name] for name in sorted(statuses)]

    def fingerprint(self, name: str, precision: str = "fp32") -> str:
        """The model's fingerprint at ``precision`` (ModelManifest.fingerprint): the manifest's
        recorded digests, or the files' own where it records none; computed once per store."""
        key = (name, precision)
        known = self._fingerprints.get(key)
        if known is not None:
            return known
        manifest = self.manifest(name)
        if precision not in manifest.files:
            raise ModelNotExported(f"model {name!r} has no {precision} variant in {self.models_dir}")
        directory = self.models_dir / name

        def digest_of(file: str) -> str:
            return manifest.sha256.get(file) or sha256_of(directory / file)

        fingerprint = self._fingerprints[key] = manifest.fingerprint(precision, digest_of)
        return fingerprint

    def encoder(self, name: str, precision: str = "fp32") -> DenseEncoder | SpladeEncoder:
        """The shared encoder of (model, precision), loaded on first use."""
        key = (name, precision)
        encoder = self._loaded.get(key)
        if encoder is not None:
            return encoder
        with self._lock:
            encoder = self._loaded.get(key)
            if encoder is None:
                encoder = self._loaded[key] = self._load(name, precision)
        return encoder

    def _load(self, name: str, precision: str) -> DenseEncoder | SpladeEncoder:
        manifest = self.manifest(name)
        if precision not in PRECISIONS:
            raise InvalidModel(f"precision {precision!r}: valid: {', '.join(PRECISIONS)}")
        file = manifest.files.get(precision)
        if file is None:
            raise ModelNotExported(
                f"model {name!r} has no {precision} variant in {self.models_dir}; "
                f"run `{self.export_command(name)} --force`"
            )
        directory = self.models_dir / name
        try:
            session = open_session(directory / file, self.threads)
            tokenizer = TextTokenizer(directory / manifest.tokenizer, manifest.max_length)
        except Exception as err:
            raise InvalidModel(f"model {name!r} ({precision}) does not load: {err}") from err
        cls = DenseEncoder if manifest.kind == "dense" else SpladeEncoder
        return cls(manifest, session, tokenizer, self.batch_size)

    def verify(self, name: str) -> list[str]:
        """Check an export: file hashes, every precision loads and encodes, batching changes nothing.

        Returns one line per check passed; raises InvalidModel at the first failure.
        """
        manifest = self.manifest(name)
        directory = self.models_dir / name
        report = []
        for file, digest in manifest.sha256.items():
            if sha256_of(directory / file) != digest:
                raise InvalidModel(f"model {name!r}: {file} does not match its sha256 in {MANIFEST_NAME}")
        report.append(f"sha256 of {len(manifest.sha256)} files match")
        outputs = {}
        for precision in manifest.files:
            encoder = self.encoder(name, precision)
            batched = _dense_rows(encoder, VERIFY_TEXTS)
            single = np.concatenate([_dense_rows(encoder, [text]) for text in VERIFY_TEXTS])
            if not np.all(np.isfinite(batched)):
                raise InvalidModel(f"model {name!r} ({precision}): non-finite output")
            agreement = float(_cosines(batched, single).min())
            # int8 scales activations per call, so its rows depend slightly on their batch companions.
            if agreement < (0.9999 if precision == "fp32" else 0.95):
                raise InvalidModel(
                    f"model {name!r} ({precision}): batched and single encodings differ ({agreement:.6f})"
                )
            outputs[precision] = batched
            report.append(
                f"{precision}: loads, output width {batched.shape[1]}, batch/single cosine >= {agreement:.6f}"
            )
        if "int8" in outputs:
            agreement = float(_cosines(outputs["fp32"], outputs["int8"]).min())
            if agreement < 0.95:
                raise InvalidModel(f"model {name!r}: int8 drifts from fp32 (min cosine {agreement:.4f})")
            report.append(f"int8 vs fp32 min cosine {agreement:.4f}")
        return report


def _dense_rows(encoder: DenseEncoder | SpladeEncoder, texts: list[str]) -> np.ndarray:
    if isinstance(encoder, DenseEncoder):
        return encoder.encode(texts)
    return encoder.weights(texts)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; two all-zero rows (an empty SPLADE vector) count as equal."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(axis=1) / np.maximum(norm_a * norm_b, 1e-12)
    return np.where((norm_a == 0) & (norm_b == 0), 1.0, cosine)
