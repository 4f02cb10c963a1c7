"""Impact-scored inverted index of one learned-sparse field in one shard.

score(query, doc) = sum over shared terms t of q_t * d_t (a dot product).

Term keys are int64: a client term id i (uint32) is the key i itself; a client
token string is interned in a per-field vocabulary and keyed 2**32 + its
vocabulary number, so ids and tokens never collide.

Each term's postings are (label int64, weight float32) pairs: a frozen numpy
pair plus a pending Python list that searches fold in, so an insert costs a
list append and a search reads contiguous arrays. Deleted versions stay in the
postings and are masked out at query time through the ``allowed`` mask; a save
drops them.

On disk (``save``), in the segment directory, prefix ``<name>.sparse``:
  ``.terms.npy``   int64[T]   term keys, ascending
  ``.offsets.npy`` int64[T+1] postings of term i are [offsets[i], offsets[i+1])
  ``.labels.npy``  int64[P]   labels, ascending within a term
  ``.weights.npy`` float32[P]
  ``.vocab.json``  list of token strings; token j has key 2**32 + j
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from . import durable

TOKEN_BASE = 1 << 32


class _Postings:
    __slots__ = ("labels", "pending_labels", "pending_weights", "weights")

    def __init__(self, labels: np.ndarray | None = None, weights: np.ndarray | None = None) -> None:
        self.labels = labels if labels is not None else np.empty(0, np.int64)
        self.weights = weights if weights is not None else np.empty(0, np.float32)
        self.pending_labels: list[int] = []
        self.pending_weights: list[float] = []

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending_labels:
            n = len(self.pending_labels)
            # Fold the pending tail in; concurrent readers may both fold, which is
            # harmless because the writer lock excludes appends during searches.
            labels = np.concatenate([self.labels, np.asarray(self.pending_labels[:n], np.int64)])
            weights = np.concatenate([self.weights, np.asarray(self.pending_weights[:n], np.float32)])
            del self.pending_labels[:n], self.pending_weights[:n]
            self.labels, self.weights = labels, weights
        return self.labels, self.weights


class SparseIndex:
    """Inverted index with a forward copy per label (for Get and compaction)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._postings: dict[int, _Postings] = {}
        self._forward: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._vocab: dict[str, int] = {}
        self._tokens: list[str] = []
        self._fold_lock = threading.Lock()
        self._entries = 0  # (label, weight) pairs in the postings, deleted versions included
        self._forward_entries = 0  # pairs in the forward copies of live labels

    # ------------------------------------------------------------------- terms

    def keys_for(self, indices: list[int] | None, tokens: list[str] | None, intern: bool) -> np.ndarray:
        """Term keys of a vector given by ids or tokens; unknown tokens map to -1 unless interned."""
        if tokens:
            keys = []
            for token in tokens:
                number = self._vocab.get(token)
                if number is None:
                    if not intern:
                        keys.append(-1)
                        continue
                    number = self._vocab[token] = len(self._tokens)
                    self._tokens.append(token)
                keys.append(TOKEN_BASE + number)
            return np.asarray(keys, np.int64)
        return np.asarray(indices or [], np.int64)

    def describe(self, keys: np.ndarray) -> tuple[list[int], list[str]]:
        """Split keys back into client ids and tokens (one of the two lists is used per vector)."""
        ids = [int(k) for k in keys if k < TOKEN_BASE]
        tokens = [self._tokens[int(k) - TOKEN_BASE] for k in keys if k >= TOKEN_BASE]
        return ids, tokens

    # ------------------------------------------------------------------ writes

    def add(self, label: int, keys: np.ndarray, weights: np.ndarray) -> None:
        self._forward[label] = (keys, weights)
        self._entries += len(keys)
        self._forward_entries += len(keys)
        for key, weight in zip(keys.tolist(), weights.tolist(), strict=True):
            postings = self._postings.get(key)
            if postings is None:
                postings = self._postings[key] = _Postings()
            postings.pending_labels.append(label)
            postings.pending_weights.append(weight)

    def remove(self, label: int) -> None:
        # Postings stay until the next save; the shard's alive mask hides them.
        gone = self._forward.pop(label, None)
        if gone is not None:
            self._forward_entries -= len(gone[0])

    def get(self, label: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self._forward.get(label)

    def __len__(self) -> int:
        return len(self._forward)

    def memory_bytes(self) -> int:
        """Estimated resident bytes, from counts kept as writes arrive (no walk over the index):
        12 bytes a posting (int64 label + float32 weight; deleted versions stay until a restart),
        the same a forward pair, ~330 bytes a live label (two numpy headers, a tuple, a dict slot)
        and ~250 bytes a term (its postings object and arrays, a dict slot). Postings not yet
        folded into arrays by a search cost more (Python lists) and are counted as folded."""
        return 12 * (self._entries + self._forward_entries) + 330 * len(self._forward) + 250 * len(self._postings)

    # ----------------------------------------------------------------- queries

    def search(
        self, keys: np.ndarray, weights: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k labels by dot product among labels set in ``allowed``, as (labels, scores) best first."""
        label_parts, score_parts = [], []
        with self._fold_lock:
            for key, weight in zip(keys.tolist(), weights.tolist(), strict=True):
                postings = self._postings.get(key)
                if postings is None or weight == 0.0:
                    continue
                labels, doc_weights = postings.arrays()
                label_parts.append(labels)
                score_parts.append(doc_weights * np.float32(weight))
        if not label_parts:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        labels = np.concatenate(label_parts)
        contributions = np.concatenate(score_parts)
        inside = labels < len(allowed)
        keep = inside & allowed[np.where(inside, labels, 0)]
        labels, contributions = labels[keep], contributions[keep]
        if len(labels) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        unique, inverse = np.unique(labels, return_inverse=True)
        scores = np.bincount(inverse, weights=contributions).astype(np.float32)
        if k < len(scores):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(scores))
        # Best score first; ties by smaller label so the order is deterministic.
        order = np.lexsort((unique[top], -scores[top]))
        top = top[order]
        return unique[top], scores[top]

    def document_frequency(self, keys: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """int64 per key: how many labels set in ``allowed`` have a posting for it."""
        counts = np.zeros(len(keys), np.int64)
        with self._fold_lock:
            for i, key in enumerate(keys.tolist()):
                postings = self._postings.get(key)
                if postings is None:
                    continue
                labels, _ = postings.arrays()
                labels = labels[labels < len(allowed)]
                counts[i] = np.count_nonzero(allowed[labels])
        return counts

    # ------------------------------------------------------------- persistence

    def save(self, directory: Path) -> None:
        """Write live postings only (deleted versions are gone from the forward map)."""
        items = sorted(self._forward.items())
        if items:
            labels = np.concatenate([np.full(len(keys), label, np.int64) for label, (keys, _) in items])
            keys = np.concatenate([keys for _, (keys, _) in items])
            weights = np.concatenate([w for _, (_, w) in items]).astype(np.float32)
        else:
            labels, keys, weights = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        order = np.lexsort((labels, keys))
        keys, labels, weights = keys[order], labels[order], weights[order]
        terms, starts = np.unique(keys, return_index=True)
        offsets = np.append(starts, len(keys)).astype(np.int64)
        prefix = directory / f"{self.name}.sparse"
        for suffix, array in (("terms", terms), ("offsets", offsets), ("labels", labels), ("weights", weights)):
            _save_npy(Path(f"{prefix}.{suffix}.npy"), array)
        durable.write_bytes(Path(f"{prefix}.vocab.json"), json.dumps(self._tokens).encode("utf-8"))

    @classmethod
    def load(cls, directory: Path, name: str) -> SparseIndex:
        index = cls(name)
        prefix = directory / f"{name}.sparse"
        if not Path(f"{prefix}.terms.npy").exists():
            return index
        terms = np.load(f"{prefix}.terms.npy")
        offsets = np.load(f"{prefix}.offsets.npy")
        labels = np.load(f"{prefix}.labels.npy")
        weights = np.load(f"{prefix}.weights.npy")
        index._tokens = json.loads(Path(f"{prefix}.vocab.json").read_text())
        index._vocab = {token: i for i, token in enumerate(index._tokens)}
        for i, term in enumerate(terms.tolist()):
            lo, hi = offsets[i], offsets[i + 1]
            index._postings[term] = _Postings(labels[lo:hi].copy(), weights[lo:hi].copy())
        index._entries = index._forward_entries = len(labels)
        term_of_posting = np.repeat(terms, np.diff(offsets))
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
        for group in np.split(order, bounds) if len(order) else []:
            label = int(labels[group[0]])
            index._forward[label] = (term_of_posting[group], weights[group])
        return index


def _save_npy(path: Path, array: np.ndarray) -> None:
    durable.write_npy(path, array)  # a temporary name, fsynced, read back, renamed (index/durable.py)
