"""Dense text encoder: tokenize, run the ONNX graph, pool, normalize.

    mean pooling:  v = sum_t(mask_t * h_t) / max(sum_t mask_t, 1e-9)
    cls pooling:   v = h_0
    normalize:     v / max(||v||_2, 1e-12)

(the formulas of sentence-transformers' Pooling and Normalize modules). Texts are
sorted by token count and cut into calls of ``batch_size`` so short texts are not
padded to the longest one of a request; results come back in input order. Calls
of 8 texts measured fastest on a 2-core AVX2 machine (docs/benchmarks.md): the
model is compute-bound already at one text, so bigger calls mostly add padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .runtime import OnnxEncoder
from .tokenize import ModelInputs


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """[batch, seq, dim] hidden states (or an already pooled [batch, dim]) -> [batch, dim] float32."""
    if hidden.ndim == 2:
        vectors = hidden
    elif pooling == "cls":
        vectors = hidden[:, 0]
    else:
        mask = attention_mask.astype(np.float32)
        vectors = np.einsum("bsd,bs->bd", hidden, mask) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of similar token length (less padding per model call)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class DenseEncoder(OnnxEncoder):
    @property
    def dim(self) -> int:
        return self.manifest.dim

    def run(self, inputs: ModelInputs) -> np.ndarray:
        (hidden,) = self.session.run([self.manifest.output], inputs.feed(self._input_names))
        return pool(hidden, inputs.attention_mask, self.manifest.pooling, self.manifest.normalize)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], row i the embedding of texts[i]."""
        out = np.empty((len(texts), self.dim), np.float32)
        if len(texts) <= 1:
            if texts:
                out[:] = self.run(self.tokenizer.encode(list(texts)))
            return out
        for positions in length_batches(self.tokenizer.token_counts(list(texts)), self.batch_size):
            out[positions] = self.run(self.tokenizer.encode([texts[i] for i in positions]))
        return out
