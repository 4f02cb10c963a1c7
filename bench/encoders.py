"""Encoder throughput: Braid's DenseEncoder against raw onnxruntime (and sentence-transformers), in one run.

    .venv/bin/python bench/encoders.py [--quick] [--models-dir bench/results/models] [--data ../shared/data]
    /tmp/stref/bin/python bench/encoders.py      # a venv with sentence-transformers: adds its column

Model all-minilm-l6-v2 (exported into --models-dir first if it is not there yet).

1. Throughput, sentences/s at batch sizes 1, 8, 32, 128, precisions fp32 and int8, of
     braid  ``ModelStore(models_dir).encoder(name, precision).encode(batch)`` (the service's path;
            its default batch_size 32 cuts a 128-text request into length-sorted batches of 32),
     raw    the thinnest code on the same .onnx file: ``tokenizers`` (truncation 256, padding to
            the longest text), one ``InferenceSession.run``, masked mean pooling and L2
            normalisation in numpy, in a session opened with the same options
            (``braid.encoders.runtime.open_session``), so only Braid's own overhead differs,
     st     sentence-transformers on the same checkpoint (torch, fp32 only), when it imports,
   and braid/raw per row (target >= 0.9). The row "128 (1 call)" uses a store with
   batch_size 128, i.e. the same single model call as raw. braid and raw alternate batch by
   batch (order flipped every batch), so drift of this shared VM hits both alike; each row is
   the median over rounds, ratios are medians of the per-round ratios.
   Texts: sentences cut from title + " " + text of the BEIR-layout corpora in --data (fixed
   seed), generated sentences when there are none.
2. Micro-batcher: 32 threads released together by a barrier, each encoding one short query
   (``MicroBatcher(run=encoder.encode, max_batch=32, max_wait_s=...)``), against the same 32
   queries as 32 sequential single ``encode`` calls and as 32 threads calling ``encode``
   directly; wall time per round, texts/s, model calls per round, speed-up over sequential.

Results also go to bench/results/encoders.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from braid.encoders.batcher import MicroBatcher  # noqa: E402
from braid.encoders.dense import DenseEncoder  # noqa: E402
from braid.encoders.export import BUILTIN_MODELS, export_builtin  # noqa: E402
from braid.encoders.manifest import ModelManifest  # noqa: E402
from braid.encoders.registry import ModelStore  # noqa: E402
from braid.encoders.runtime import default_threads, open_session  # noqa: E402

Encode = Callable[[list[str]], np.ndarray]
console = Console(width=240)

# ------------------------------------------------------------------ texts

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORDS = (
    "the a of in on for with measured results model flow pressure patients study cells protein library "
    "information retrieval system computer program boundary layer heat transfer effect method analysis "
    "data search query index report increase decrease treatment clinical theory experimental shows"
).split()


def corpus_sentences(data: Path, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of title + " " + text of every BEIR-layout corpus under ``data``."""
    sentences = []
    for corpus in sorted(data.glob("*/corpus.jsonl")):
        with corpus.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                text = f"{row.get('title', '')} {row.get('text', '')}".strip()
                for sentence in SENTENCE_END.split(text):
                    if min_words <= len(sentence.split()) <= max_words:
                        sentences.append(sentence)
    return sentences


def corpus_queries(data: Path, max_words: int = 16) -> list[str]:
    queries = []
    for path in sorted(data.glob("*/queries.jsonl")):
        with path.open(encoding="utf-8") as fh:
            queries += [t for line in fh if 3 <= len((t := json.loads(line)["text"]).split()) <= max_words]
    return queries


def generated(rng: random.Random, count: int, low: int, high: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "." for _ in range(count)]


def pick_texts(data: Path, seed: int, count: int, queries: int) -> tuple[list[str], list[str], str]:
    rng = random.Random(seed)
    sentences = corpus_sentences(data) if data.is_dir() else []
    pool_queries = corpus_queries(data) if data.is_dir() else []
    if len(sentences) >= count and len(pool_queries) >= queries:
        source = f"sentences of {len(list(data.glob('*/corpus.jsonl')))} corpora in {data}"
        return rng.sample(sentences, count), rng.sample(pool_queries, queries), source
    return generated(rng, count, 8, 40), generated(rng, queries, 3, 12), "generated sentences (no corpora found)"


# ------------------------------------------------------------------ references


class RawOnnx:
    """The thinnest dense encoder on the same files: tokenize, one session.run, mean-pool, normalize."""

    def __init__(self, directory: Path, manifest: ModelManifest, precision: str, threads: int | None) -> None:
        self.session = open_session(directory / manifest.files[precision], threads)
        self.output = manifest.output
        self.tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer))
        self.tokenizer.enable_truncation(max_length=manifest.max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)  # to the longest text

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self.session.run([self.output], feed)
        weights = mask[:, :, None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def sentence_transformers_encoder(model: str) -> Encode | None:
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(BUILTIN_MODELS[model].checkpoint_dir()), device="cpu")
    st.max_seq_length = 256
    torch.set_grad_enabled(False)

    def encode(texts: list[str]) -> np.ndarray:
        return st.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    encode.torch_threads = torch.get_num_threads()  # type: ignore[attr-defined]
    return encode


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ------------------------------------------------------------------ throughput


@dataclass
class Row:
    precision: str
    batch: str
    rates: dict[str, list[float]] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)  # braid / raw, per round
    st_ratios: list[float] = field(default_factory=list)  # braid / st, per round

    def rate(self, name: str) -> float | None:
        return statistics.median(self.rates[name]) if self.rates.get(name) else None


def timed(encode: Encode, batch: list[str]) -> float:
    started = time.perf_counter()
    encode(batch)
    return time.perf_counter() - started


def throughput(
    texts: list[str], batch: int, braid: Encode, raw: Encode, st: Encode | None, rounds: int, row: Row
) -> None:
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    for encode in (braid, raw, *([st] if st else [])):  # warm up: first calls, the largest shapes
        for b in (batches[0], batches[-1], max(batches, key=lambda b: max(map(len, b)))):
            encode(b)
    pair = (("braid", braid), ("raw", raw))
    for r in range(rounds):
        spent = {"braid": 0.0, "raw": 0.0, "st": 0.0}
        st_first = r % 2 == 1
        if st and st_first:
            spent["st"] = sum(timed(st, b) for b in batches)
        for i, b in enumerate(batches):
            for name, encode in pair if (i + r) % 2 == 0 else pair[::-1]:
                spent[name] += timed(encode, b)
        if st and not st_first:
            spent["st"] = sum(timed(st, b) for b in batches)
        for name in ("braid", "raw", *(["st"] if st else [])):
            row.rates.setdefault(name, []).append(len(texts) / spent[name])
        row.ratios.append(spent["raw"] / spent["braid"])
        if st:
            row.st_ratios.append(spent["st"] / spent["braid"])


def throughput_table(rows: list[Row], with_st: bool) -> Table:
    table = Table(box=box.MARKDOWN)
    columns = ["precision", "batch", "braid sent/s", "raw ORT sent/s", "braid/raw"]
    if with_st:
        columns += ["sentence-transformers sent/s", "braid/st"]
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows:
        cells = [row.precision, row.batch, f"{row.rate('braid'):,.0f}", f"{row.rate('raw'):,.0f}"]
        cells.append(f"{statistics.median(row.ratios):.2f}")
        if with_st:
            st = row.rate("st")
            cells += [f"{st:,.0f}", f"{statistics.median(row.st_ratios):.2f}"] if st else ["-", "-"]
        table.add_row(*cells)
    return table


# ------------------------------------------------------------------ micro-batcher


class Fleet:
    """``count`` threads that each run ``work(i)`` once per round, all released together."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.start = threading.Barrier(count + 1)
        self.done = threading.Barrier(count + 1)
        self.work: Callable[[int], None] | None = None
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self, i: int) -> None:
        while True:
            self.start.wait()
            work = self.work
            if work is None:
                return
            try:
                work(i)
            except BaseException as err:  # reported by the main thread
                self.errors.append(err)
            self.done.wait()

    def round(self, work: Callable[[int], None]) -> float:
        self.work = work
        self.start.wait()
        started = time.perf_counter()
        self.done.wait()
        elapsed = time.perf_counter() - started
        if self.errors:
            raise self.errors[0]
        return elapsed

    def close(self) -> None:
        self.work = None
        self.start.wait()
        for thread in self.threads:
            thread.join()


@dataclass
class BatcherRow:
    mode: str
    walls: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)


def micro_batcher(
    encoder: DenseEncoder, queries: list[str], threads: int, rounds: int, waits: Sequence[float]
) -> tuple[list[BatcherRow], float]:
    """Rows of wall time per round; returns also the largest |difference| from direct single encodes."""
    sets = [queries[r * threads : (r + 1) * threads] for r in range(rounds)]
    direct = [encoder.encode([q]) for q in queries[: threads * rounds]]  # warm-up and reference rows
    sequential = BatcherRow(f"sequential: {threads} single encode calls")
    unbatched = BatcherRow(f"{threads} threads, encode directly (no batcher)")
    batchers = [(BatcherRow(f"{threads} threads, MicroBatcher max_wait_s={w:g}"), w) for w in waits]
    fleet = Fleet(threads)
    worst = 0.0
    try:
        for r, texts in enumerate(sets):
            out: list[np.ndarray | None] = [None] * threads
            modes: list[Callable[[], None]] = []

            def run_sequential(texts: list[str] = texts) -> None:
                started = time.perf_counter()
                for q in texts:
                    encoder.encode([q])
                sequential.walls.append(time.perf_counter() - started)
                sequential.calls.append(len(texts))

            def run_unbatched(texts: list[str] = texts) -> None:
                unbatched.walls.append(fleet.round(lambda i: encoder.encode([texts[i]])))
                unbatched.calls.append(len(texts))

            modes += [run_sequential, run_unbatched]
            for row, wait in batchers:

                def run_batched(texts: list[str] = texts, row: BatcherRow = row, wait: float = wait) -> None:
                    batcher: MicroBatcher[np.ndarray] = MicroBatcher(
                        run=encoder.encode, max_batch=threads, max_wait_s=wait
                    )
                    try:

                        def one(i: int) -> None:
                            out[i] = np.asarray(batcher.encode([texts[i]]))

                        row.walls.append(fleet.round(one))
                        row.calls.append(batcher.calls)
                    finally:
                        batcher.close()

                modes.append(run_batched)
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:  # rotate the order every round
                mode()
            for i, got in enumerate(out):
                worst = max(worst, float(np.abs(got - direct[r * threads + i]).max()))  # type: ignore[operator]
    finally:
        fleet.close()
    return [sequential, unbatched, *(row for row, _ in batchers)], worst


def batcher_table(rows: list[BatcherRow], threads: int) -> Table:
    table = Table(box=box.MARKDOWN)
    for i, name in enumerate(["mode", "wall ms/round", "texts/s", "model calls/round", "speed-up"]):
        table.add_column(name, justify="left" if i == 0 else "right")
    base = statistics.median(rows[0].walls)
    for row in rows:
        wall = statistics.median(row.walls)
        table.add_row(
            row.mode,
            f"{wall * 1000:.1f}",
            f"{threads / wall:,.0f}",
            f"{statistics.mean(row.calls):.1f}",
            f"{base / wall:.2f}x",
        )
    return table


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=RESULTS / "models")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--texts", type=int, default=256, help="texts per round of each throughput row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all CPUs)")
    parser.add_argument("--batcher-threads", type=int, default=32)
    parser.add_argument("--batcher-rounds", type=int, default=20)
    parser.add_argument("--waits", default="0,0.002", help="MicroBatcher max_wait_s values")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: few texts, one round, a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.rounds, args.batches, args.batcher_rounds = 32, 1, "1,8,32", 2
    batch_sizes = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    started = time.perf_counter()

    manifest = export_builtin(args.model, args.models_dir)  # keeps an existing complete export
    directory = args.models_dir / args.model
    store = ModelStore(args.models_dir, threads=args.threads)
    texts, queries, source = pick_texts(args.data, args.seed, args.texts, args.batcher_threads * args.batcher_rounds)
    fp32 = store.encoder(args.model, "fp32")
    assert isinstance(fp32, DenseEncoder)
    tokens = fp32.tokenizer.encode(texts).attention_mask.sum(axis=1)
    query_tokens = fp32.tokenizer.encode(queries).attention_mask.sum(axis=1)
    st = sentence_transformers_encoder(args.model)
    threads = args.threads or default_threads()
    print(
        f"model {args.model} ({directory}); onnxruntime intra-op threads {threads}, spinning off; "
        f"store batch_size {store.batch_size}"
    )
    print(
        f"texts: {len(texts)} {source}, seed {args.seed}; tokens per text mean {tokens.mean():.1f}, "
        f"median {np.median(tokens):.0f}, p90 {np.percentile(tokens, 90):.0f}, max {tokens.max()}"
    )
    if st is None:
        print("sentence-transformers column skipped: `import sentence_transformers` fails in this environment")
    else:
        import sentence_transformers
        import torch

        print(
            f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
            f"{st.torch_threads} torch threads"  # type: ignore[attr-defined]
        )

    rows: list[Row] = []
    checks: list[str] = []
    outputs: dict[str, np.ndarray] = {}
    for precision in precisions:
        encoder = store.encoder(args.model, precision)
        assert isinstance(encoder, DenseEncoder)
        raw = RawOnnx(directory, manifest, precision, args.threads)
        sample = texts[:32]
        outputs[precision] = encoder.encode(sample)
        checks.append(f"{precision}: braid vs raw min cosine {min_cosine(outputs[precision], raw.encode(sample)):.6f}")
        precision_st = st if precision == "fp32" else None
        if precision_st:
            checks.append(
                f"fp32: braid vs sentence-transformers min cosine {min_cosine(outputs['fp32'], st(sample)):.6f}"
            )
        for batch in batch_sizes:
            rows.append(Row(precision, str(batch)))
            throughput(texts, batch, encoder.encode, raw.encode, precision_st, args.rounds, rows[-1])
            if batch > store.batch_size:
                one_call = ModelStore(args.models_dir, threads=args.threads, batch_size=batch).encoder(
                    args.model, precision
                )
                rows.append(Row(precision, f"{batch} (1 call)"))
                throughput(texts, batch, one_call.encode, raw.encode, precision_st, args.rounds, rows[-1])
    if "fp32" in outputs and "int8" in outputs:
        checks.append(f"int8 vs fp32 (braid) min cosine {min_cosine(outputs['fp32'], outputs['int8']):.4f}")

    print(f"\nThroughput, {len(texts)} texts x {args.rounds} rounds per row (median round):")
    console.print(throughput_table(rows, st is not None))
    print("; ".join(checks))

    print(
        f"\nMicro-batcher, fp32: {args.batcher_threads} queries per round x {args.batcher_rounds} rounds; "
        f"query tokens mean {query_tokens.mean():.1f}, max {query_tokens.max()}"
    )
    waits = [float(w) for w in args.waits.split(",")]
    batcher_rows, worst = micro_batcher(fp32, queries, args.batcher_threads, args.batcher_rounds, waits)
    console.print(batcher_table(batcher_rows, args.batcher_threads))
    print(f"batcher rows vs single encode calls: max |difference| {worst:.2e}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("encoders-quick.json" if args.quick else "encoders.json")).write_text(
        json.dumps(
            {
                "model": args.model,
                "threads": threads,
                "texts": source,
                "sentence_transformers": st is not None,
                "throughput": [
                    {"precision": r.precision, "batch": r.batch, "rates": r.rates, "braid_over_raw": r.ratios}
                    for r in rows
                ],
                "checks": checks,
                "batcher": [{"mode": r.mode, "walls": r.walls, "calls": r.calls} for r in batcher_rows],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
