"""Learned-sparse encoders: SPLADE documents and queries, and inference-free queries.

SPLADE (Formal et al.): for a BertForMaskedLM graph with logits l[t, v],

    w_v = max over non-padding positions t of log(1 + relu(l[t, v]))

then special tokens are dropped and only the ``top_k`` largest weights kept.
Braid's own exports compute w in the graph (output ``splade``, [batch, vocab]);
a registered export that outputs ``logits`` ([batch, seq, vocab]) is pooled here.
Either way a model call takes only as many texts as keep the logits under
``LOGITS_BUDGET`` bytes.

Inference-free mode (doc-side-only encoders, as in OpenSearch's neural sparse
"doc-only" models): documents run the model once at indexing; a query is only
tokenized, each distinct vocabulary id weighted by the collection's IDF
(computed by the index, not here), so queries never call the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .dense import length_batches
from .manifest import ModelManifest
from .runtime import OnnxEncoder
from .tokenize import TextTokenizer

LOGITS_BUDGET = 256 << 20  # bytes of [rows, seq, vocab] float32 logits per model call

SparseVector = tuple[np.ndarray, np.ndarray]  # (uint32 vocabulary ids ascending, float32 weights)


def top_terms(weights: np.ndarray, top_k: int, drop: np.ndarray) -> SparseVector:
    """The ``top_k`` largest positive weights of one [vocab] row, ids ascending."""
    row = weights.copy()
    row[drop] = 0.0
    positive = np.flatnonzero(row > 0)
    if positive.size > top_k:
        keep = np.argpartition(row[positive], positive.size - top_k)[positive.size - top_k :]
        positive = np.sort(positive[keep])
    return positive.astype(np.uint32), row[positive].astype(np.float32)


class SpladeEncoder(OnnxEncoder):
    def __init__(
        self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: TextTokenizer, batch_size: int = 8
    ) -> None:
        super().__init__(manifest, session, tokenizer, batch_size)
        self.vocab_size = manifest.dim
        self.special_ids = np.asarray(sorted(i for i in tokenizer.special_ids if i < self.vocab_size), np.int64)

    def weights(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), vocab] SPLADE weights of one batch.

        The graph holds [rows, seq, vocab] logits, so it runs on as many rows at a time
        as keep that tensor under ``LOGITS_BUDGET`` bytes (8 rows of 256 tokens).
        """
        inputs = self.tokenizer.encode(texts)
        feed = inputs.feed(self._input_names)
        step = max(1, LOGITS_BUDGET // (inputs.input_ids.shape[1] * self.vocab_size * 4))
        parts = []
        for start in range(0, len(texts), step):
            chunk = {name: value[start : start + step] for name, value in feed.items()}
            if self.manifest.output == "splade":
                parts.append(self.session.run(["splade"], chunk)[0])
                continue
            (logits,) = self.session.run([self.manifest.output], chunk)
            mask = inputs.attention_mask[start : start + step, :, None].astype(np.float32)
            parts.append((np.log1p(np.maximum(logits, 0.0)) * mask).max(axis=1))
        return np.concatenate(parts)

    def encode(self, texts: Sequence[str], top_k: int) -> list[SparseVector]:
        out: list[SparseVector] = [None] * len(texts)  # type: ignore[list-item]
        for positions in length_batches(self.tokenizer.token_counts(list(texts)), self.batch_size):
            weights = self.weights([texts[i] for i in positions])
            for row, position in enumerate(positions):
                out[position] = top_terms(weights[row], top_k, self.special_ids)
        return out
