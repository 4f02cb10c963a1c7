"""Tokenization with Hugging Face ``tokenizers``: texts -> padded int64 model inputs.

One ``TextTokenizer`` per model. Batches are padded to the longest text in the
batch (not to a fixed length) and truncated at the model's max length, which is
what sentence-transformers does, so embeddings match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class ModelInputs:
    """int64 arrays of shape [batch, seq], named as the ONNX graph's inputs."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def feed(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in names}


class TextTokenizer:
    def __init__(self, path: Path, max_length: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self.max_length = max_length
        # tokenizer.json files often ship fixed-length padding; Braid pads per batch.
        self._tokenizer.enable_truncation(max_length=max_length)
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0)
        self.special_ids = frozenset(
            i
            for token in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")
            if (i := self._tokenizer.token_to_id(token)) is not None
        )
        self.vocab_size = self._tokenizer.get_vocab_size()
        # An unpadded twin for counting tokens (padding is tokenizer state, so not toggled per call).
        self._counter = Tokenizer.from_str(self._tokenizer.to_str())
        self._counter.no_padding()

    def encode(self, texts: list[str]) -> ModelInputs:
        encodings = self._tokenizer.encode_batch(texts)
        return ModelInputs(
            input_ids=np.asarray([e.ids for e in encodings], np.int64),
            attention_mask=np.asarray([e.attention_mask for e in encodings], np.int64),
            token_type_ids=np.asarray([e.type_ids for e in encodings], np.int64),
        )

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text after truncation (special tokens included), for length-sorted batching."""
        return [len(e.ids) for e in self._counter.encode_batch(texts)]

    def term_ids(self, text: str) -> list[int]:
        """The distinct vocabulary ids of a text, special tokens left out (inference-free queries)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return sorted({i for i in encoding.ids if i not in self.special_ids})

    def token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)
