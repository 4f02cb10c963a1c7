"""ONNX Runtime sessions with Braid's deliberate settings.

- Graph optimization ORT_ENABLE_ALL: constant folding, MatMul+Add and LayerNorm /
  GELU fusions; the optimized graph is built once, when the session opens.
- intra-op threads = the number of CPUs the process may use (or the configured
  count), inter-op threads = 1 and sequential execution: a BERT graph is a chain,
  so parallelism lives inside each MatMul.
- Thread spinning off: the encoder shares the CPU with gRPC and the index, and a
  spinning pool would burn the cores those need between model calls.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .manifest import ModelManifest
from .tokenize import TextTokenizer


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def open_session(path: Path, threads: int | None = None, spinning: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """A loaded model: its manifest, ONNX session and tokenizer (the base of the dense and sparse encoders)."""

    def __init__(
        self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: TextTokenizer, batch_size: int = 8
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._input_names = tuple(i.name for i in session.get_inputs())
