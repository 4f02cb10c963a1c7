"""Encoder throughput: Braid's DenseEncoder against raw onnxruntime (and sentence-transformers), in one run.

    .venv/bin/python bench/encoders.py [--quick] [--models-dir bench/results/models] [--data ../shared/data]
    .venv-reference/bin/python bench/encoders.py      # a venv with sentence-transformers: adds its column

Model all-minilm-l6-v2 (exported into --models-dir first if it is not there yet).

1. Throughput, sentences/s at batch sizes 1, 8, 32, 128, precisions fp32 and int8, of
     braid  ``ModelStore(models_dir).encoder(name, precision).encode(batch)`` (the service's path;
            its default batch_size 32 cuts a 128-text request into length-sorted batches of 32),
     raw    the thinnest code on the same .onnx file: ``tokenizers`` (truncation 256, padding to
            the longest text), one ``InferenceSession.run``, masked mean pooling and L2
            normalisation in numpy, in a session opened with the same options
            (``braid.encoders.runtime.open_session``), so only Braid's own overhead differs,
     st     sentence-transformers on the same checkpoint (torch, fp32 only), when it imports,
   and braid/raw per row (target >= 0.9); for int8, "braid vs fp32" is its speed over fp32
   Braid's. The row "128 (1 call)" uses a store with batch_size 128, i.e. the same single
   model call as raw. The four ONNX encoders (braid and raw, fp32 and int8) take turns batch
   by batch, the order rotating every batch, so drift of this shared VM hits all alike
   (sentence-transformers runs its pass before or after theirs); each figure is the median
   over rounds (1.5x the rounds for batch 128: one call is one measurement there), ratios
   are medians of the per-round ratios. A round during which other processes used more than
   5 % of the machine is run again after waiting for quiet (see CpuWatch).
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
import os
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
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
# fmt: off
WORDS = (
    "the", "a", "of", "in", "on", "for", "with", "measured", "results", "model", "flow", "pressure",
    "patients", "study", "cells", "protein", "library", "information", "retrieval", "system", "computer",
    "program", "boundary", "layer", "heat", "transfer", "effect", "method", "analysis", "data", "search",
    "query", "index", "report", "increase", "decrease", "treatment", "clinical", "theory", "experimental",
    "shows",
)
# fmt: on


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
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return None
    transformers_logging.disable_progress_bar()
    st = SentenceTransformer(str(BUILTIN_MODELS[model].checkpoint_dir()), device="cpu")
    st.max_seq_length = BUILTIN_MODELS[model].max_length  # 256, as Braid's export
    torch.set_grad_enabled(False)

    def encode(texts: list[str]) -> np.ndarray:
        return st.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    return encode


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ------------------------------------------------------------------ other processes


class CpuWatch:
    """CPU time used by *other* processes (Linux /proc/stat minus this process), to flag disturbed rounds.

    The standard machine is shared: a test suite started beside the benchmark takes one of
    the two cores and halves whatever is being timed. A round during which other processes
    used more than ``threshold`` of the machine is run again after waiting for quiet.
    """

    def __init__(self, threshold: float, wait_limit_s: float, attempts: int) -> None:
        self.available = Path("/proc/stat").is_file()
        self.threshold = threshold
        self.wait_limit_s = wait_limit_s
        self.attempts = attempts if self.available else 1
        self.cpus = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.rerun = 0
        self.waited_s = 0.0
        self.accepted: list[float] = []  # others' share of the machine in every round kept

    def sample(self) -> tuple[float, float, float]:
        """(wall s, busy CPU s of the whole machine, CPU s of this process)."""
        busy = 0.0
        if self.available:
            with open("/proc/stat") as fh:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
            busy = (user + nice + system + irq + softirq + steal) / self.tick
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def others(self, since: tuple[float, float, float]) -> float:
        """Share of the machine (0..1) other processes used since ``since``."""
        now = self.sample()
        wall = max(now[0] - since[0], 1e-9)
        return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (wall * self.cpus)

    def wait_quiet(self) -> None:
        started = time.perf_counter()
        while self.available and time.perf_counter() - started < self.wait_limit_s:
            since = self.sample()
            time.sleep(0.5)
            if self.others(since) < self.threshold:
                break
        self.waited_s += time.perf_counter() - started

    def run(self, one_round: Callable[[], Callable[[], None]]) -> None:
        """Run a round until others stay under the threshold (or attempts run out); commit the kept one.

        ``one_round`` measures and returns a function that records its figures.
        """
        for attempt in range(self.attempts):
            self.wait_quiet()
            since = self.sample()
            commit = one_round()
            share = self.others(since)
            if share <= self.threshold or attempt == self.attempts - 1:
                self.accepted.append(share)
                commit()
                return
            self.rerun += 1

    def summary(self) -> str:
        if not self.available:
            return "other processes' CPU use not measured (no /proc/stat)"
        worst = max(self.accepted, default=0.0)
        return (
            f"other processes' CPU use: {self.rerun} rounds re-run for going over {self.threshold:.0%} of the "
            f"machine, {self.waited_s:.0f} s spent waiting for quiet; worst kept round {worst:.1%}"
        )


# ------------------------------------------------------------------ throughput


@dataclass
class Row:
    """One batch size: seconds per round of every encoder, all measured in the same rounds."""

    batch: str
    texts: int
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, name: str) -> float | None:
        times = self.seconds.get(name)
        return statistics.median(self.texts / t for t in times) if times else None

    def ratio(self, name: str, reference: str) -> float | None:
        """Median over rounds of (speed of ``name``) / (speed of ``reference``)."""
        if not self.seconds.get(name) or not self.seconds.get(reference):
            return None
        return statistics.median(r / n for n, r in zip(self.seconds[name], self.seconds[reference], strict=True))


def timed(encode: Encode, batch: list[str]) -> float:
    started = time.perf_counter()
    encode(batch)
    return time.perf_counter() - started


def throughput(
    texts: list[str], batch: int, encoders: dict[str, Encode], st: Encode | None, rounds: int, watch: CpuWatch, row: Row
) -> None:
    """Every ONNX encoder on each batch in turn (the order rotating batch by batch), then st on them all."""
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    widest = max(batches, key=lambda b: max(map(len, b)))
    for encode in (*encoders.values(), *([st] if st else [])):  # warm up on the largest shape: a fresh
        encode(widest)  # session's first calls at a new size run up to 15 % slower
    named = list(encoders.items())

    def one_round(r: int) -> Callable[[], None]:
        spent = dict.fromkeys(encoders, 0.0)
        if st and r % 2:
            spent["st"] = sum(timed(st, b) for b in batches)
        for i, b in enumerate(batches):
            shift = (i + r) % len(named)
            for name, encode in named[shift:] + named[:shift]:
                spent[name] += timed(encode, b)
        if st and not r % 2:
            spent["st"] = sum(timed(st, b) for b in batches)

        def commit() -> None:
            for name, seconds in spent.items():
                row.seconds.setdefault(name, []).append(seconds)

        return commit

    # One call of 128 texts (~2.5 s) varies by about 10 % from call to call: rows with under four
    # calls a round get half as many rounds again.
    for r in range(rounds + rounds // 2 if len(batches) < 4 else rounds):
        watch.run(lambda r=r: one_round(r))


def throughput_table(rows: list[Row], precisions: list[str], with_st: bool) -> Table:
    table = Table(box=box.MARKDOWN)
    columns = ["precision", "batch", "braid sent/s", "raw ORT sent/s", "braid/raw"]
    if len(precisions) > 1:
        columns.append(f"braid vs {precisions[0]}")
    if with_st:
        columns += ["sentence-transformers sent/s", "braid/st"]
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < 2 else "right")
    for precision in precisions:
        for row in rows:
            braid, raw = f"{precision} braid", f"{precision} raw"
            cells = [precision, row.batch, f"{row.rate(braid):,.0f}", f"{row.rate(raw):,.0f}"]
            cells.append(f"{row.ratio(braid, raw):.2f}")
            if len(precisions) > 1:
                cells.append("" if precision == precisions[0] else f"{row.ratio(braid, f'{precisions[0]} braid'):.2f}")
            if with_st:
                st = row.rate("st") if precision == "fp32" else None
                cells += [f"{st:,.0f}", f"{row.ratio(braid, 'st'):.2f}"] if st else ["-", "-"]
            table.add_row(*cells)
    return table


# ------------------------------------------------------------------ micro-batcher


class Fleet:
    """``count`` threads that each run ``work(i)`` once per round, all released together by a barrier."""

    def __init__(self, count: int) -> None:
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
            except BaseException as err:  # re-raised by the main thread
                self.errors.append(err)
            self.done.wait()

    def round(self, work: Callable[[int], None]) -> float:
        """Wall seconds from the release of all threads to the last one finishing."""
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
    encoder: DenseEncoder, queries: list[str], threads: int, rounds: int, waits: Sequence[float], watch: CpuWatch
) -> tuple[list[BatcherRow], float]:
    """One row per mode; also the largest |difference| of a batcher row from the same text encoded alone."""
    direct = {q: encoder.encode([q])[0] for q in queries}  # reference rows, and the warm-up
    sequential = BatcherRow(f"sequential: {threads} single encode calls")
    unbatched = BatcherRow(f"{threads} threads, encode directly (no batcher)")
    batched = [BatcherRow(f"{threads} threads, MicroBatcher max_wait_s={w:g}") for w in waits]
    worst = [0.0]
    fleet = Fleet(threads)

    def run_sequential(texts: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        for q in texts:
            encoder.encode([q])
        return time.perf_counter() - started, len(texts)

    def run_unbatched(texts: list[str]) -> tuple[float, int]:
        return fleet.round(lambda i: encoder.encode([texts[i]])), len(texts)

    def run_batched(texts: list[str], wait: float) -> tuple[float, int]:
        batcher: MicroBatcher[np.ndarray] = MicroBatcher(run=encoder.encode, max_batch=threads, max_wait_s=wait)
        out: list[np.ndarray] = [np.empty(0)] * len(texts)

        def one(i: int) -> None:
            out[i] = np.asarray(batcher.encode([texts[i]]))[0]

        try:
            wall = fleet.round(one)
        finally:
            batcher.close()
        worst[0] = max(worst[0], *(float(np.abs(v - direct[q]).max()) for v, q in zip(out, texts, strict=True)))
        return wall, batcher.calls

    modes: list[tuple[BatcherRow, Callable[[list[str]], tuple[float, int]]]] = [
        (sequential, run_sequential),
        (unbatched, run_unbatched),
        *((row, lambda texts, w=w: run_batched(texts, w)) for row, w in zip(batched, waits, strict=True)),
    ]

    def one_round(r: int) -> Callable[[], None]:
        texts = queries[r * threads : (r + 1) * threads]
        results = [(row, mode(texts)) for row, mode in modes[r % len(modes) :] + modes[: r % len(modes)]]

        def commit() -> None:
            for row, (wall, calls) in results:
                row.walls.append(wall)
                row.calls.append(calls)

        return commit

    try:
        for r in range(rounds):
            watch.run(lambda r=r: one_round(r))
    finally:
        fleet.close()
    return [sequential, unbatched, *batched], worst[0]


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
    parser.add_argument("--texts", type=int, default=128, help="texts per round of each throughput row")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all CPUs)")
    parser.add_argument("--batcher-threads", type=int, default=32)
    parser.add_argument("--batcher-rounds", type=int, default=10)
    parser.add_argument("--waits", default="0,0.002", help="MicroBatcher max_wait_s values")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--others-max", type=float, default=0.05, help="re-run a round when other processes used more")
    parser.add_argument("--quiet-wait", type=float, default=300, help="longest wait for quiet before a round, s")
    parser.add_argument("--attempts", type=int, default=4, help="tries per round before keeping a disturbed one")
    parser.add_argument("--quick", action="store_true", help="smoke run: few texts, one round, a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.rounds, args.batches, args.batcher_rounds = 16, 1, "1,8", 1
        args.quiet_wait, args.attempts = 0, 1
    batch_sizes = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    watch = CpuWatch(args.others_max, args.quiet_wait, args.attempts)
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
        f"model {args.model} ({directory}); onnxruntime {ort.__version__}, intra-op threads {threads}, "
        f"spinning off; store batch_size {store.batch_size}"
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
            f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        )

    checks: list[str] = []
    outputs: dict[str, np.ndarray] = {}
    encoders: dict[str, Encode] = {}
    sample = texts[:32]
    for precision in precisions:
        encoder = store.encoder(args.model, precision)
        assert isinstance(encoder, DenseEncoder)
        raw = RawOnnx(directory, manifest, precision, args.threads)
        encoders |= {f"{precision} braid": encoder.encode, f"{precision} raw": raw.encode}
        outputs[precision] = encoder.encode(sample)
        checks.append(f"{precision} braid vs raw min cosine {min_cosine(outputs[precision], raw.encode(sample)):.6f}")
        alone = np.concatenate([encoder.encode([t]) for t in sample])
        checks.append(f"{precision} batch of {len(sample)} vs one by one {min_cosine(outputs[precision], alone):.6f}")
    if st and "fp32" in outputs:
        checks.append(f"fp32 braid vs sentence-transformers min cosine {min_cosine(outputs['fp32'], st(sample)):.6f}")
    if "fp32" in outputs and "int8" in outputs:
        checks.append(f"int8 vs fp32 (braid) min cosine {min_cosine(outputs['fp32'], outputs['int8']):.4f}")
    row_st = st if "fp32" in precisions else None
    rows: list[Row] = []
    for batch in batch_sizes:
        rows.append(Row(str(batch), len(texts)))
        throughput(texts, batch, encoders, row_st, args.rounds, watch, rows[-1])
        if batch > store.batch_size:  # Braid making the same single call as raw
            one_call = ModelStore(args.models_dir, args.threads, batch_size=batch)
            same_call = {
                name: one_call.encoder(args.model, name.split()[0]).encode if name.endswith("braid") else encode
                for name, encode in encoders.items()
            }
            rows.append(Row(f"{batch} (1 call)", len(texts)))
            throughput(texts, batch, same_call, row_st, args.rounds, watch, rows[-1])

    more = [str(b) for b in batch_sizes if -(-len(texts) // b) < 4]
    print(
        f"\nThroughput, sentences/s: {len(texts)} texts a round, median of {args.rounds} rounds"
        + (f" ({args.rounds + args.rounds // 2} for batch {', '.join(more)})" if more and args.rounds > 1 else "")
    )
    console.print(throughput_table(rows, precisions, row_st is not None))
    print("; ".join(checks))

    print(
        f"\nMicro-batcher, fp32: {args.batcher_threads} short queries a round (tokens mean "
        f"{query_tokens.mean():.1f}, max {query_tokens.max()}), median of {args.batcher_rounds} rounds"
    )
    waits = [float(w) for w in args.waits.split(",")]
    batcher_rows, worst = micro_batcher(fp32, queries, args.batcher_threads, args.batcher_rounds, waits, watch)
    console.print(batcher_table(batcher_rows, args.batcher_threads))
    print(f"batcher rows vs the same text encoded alone: max |difference| {worst:.1e}")
    print(f"\n{watch.summary()}")
    print(f"total {time.perf_counter() - started:.0f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"encoders{'-quick' if args.quick else ''}{'-st' if row_st else ''}.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "threads": threads,
                "texts": source,
                "throughput": [asdict(r) for r in rows],
                "checks": checks,
                "batcher": [asdict(r) for r in batcher_rows],
                "others": watch.summary(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
