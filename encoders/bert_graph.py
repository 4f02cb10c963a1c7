"""Build a BERT ONNX graph straight from a Hugging Face checkpoint (config.json + model.safetensors).

This is Braid's exporter: it writes the standard BERT encoder (and optionally the
masked-language-model head) with plain ONNX operators, reading weights with
``safetensors`` into numpy. No torch is needed, so installing Braid stays small.

Graph inputs (int64, [batch, seq]): ``input_ids``, ``attention_mask``, ``token_type_ids``.
Graph outputs:
  ``last_hidden_state`` float32 [batch, seq, hidden] -- always;
  ``splade`` float32 [batch, vocab] -- with the MLM head only:
      max over non-padding positions of log(1 + relu(logits)), the SPLADE document
      vector, computed in the graph so the [batch, seq, vocab] logits never leave it
      (as log(1 + relu(max over positions)), which is equal and needs one copy less).

The arithmetic follows Hugging Face's ``BertModel`` (post-LayerNorm blocks, exact
erf GELU, additive attention mask) so embeddings match the reference to float
rounding. Weight names may carry a ``bert.`` prefix (BertForMaskedLM checkpoints).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20  # LayerNormalization (17) and Gelu (20) are native operators here.
MASK_NEGATIVE = -1.0e4  # added to attention scores of padding; exp() underflows to 0


@dataclass(frozen=True)
class BertConfig:
    """The architecture numbers the graph needs, read from a Hugging Face config.json."""

    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not 'gelu'")
        return cls(
            hidden_size=int(raw["hidden_size"]),
            num_heads=int(raw["num_attention_heads"]),
            num_layers=int(raw["num_hidden_layers"]),
            intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]),
            max_positions=int(raw.get("max_position_embeddings", 512)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
        )


class _Weights:
    """Checkpoint tensors by their BertModel name, whatever prefix the file uses."""

    def __init__(self, path: Path) -> None:
        from safetensors.numpy import load_file

        self.tensors = load_file(str(path))
        self.prefix = "bert." if any(k.startswith("bert.") for k in self.tensors) else ""

    def __call__(self, name: str) -> np.ndarray:
        key = name if name.startswith("cls.") else self.prefix + name
        if key not in self.tensors:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        return self.tensors[key].astype(np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def pair(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """A module's ``weight`` and ``bias``: Linear (weight, bias) or LayerNorm (gamma, beta)."""
        return self(f"{prefix}.weight"), self(f"{prefix}.bias")


class _GraphBuilder:
    """Accumulates nodes and initializers; every helper returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: object) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, hint: str) -> str:
        # Hugging Face stores Linear weights as [out, in]; MatMul wants [in, out].
        product = self.op("MatMul", [x, self.const(f"{hint}.w", np.ascontiguousarray(weight.T))], hint)
        return self.op("Add", [product, self.const(f"{hint}.b", bias)], hint)

    def layer_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray, eps: float, hint: str) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.const(f"{hint}.g", gamma), self.const(f"{hint}.b", beta)],
            hint,
            axis=-1,
            epsilon=eps,
        )


def build_bert_graph(model_dir: Path, with_mlm_head: bool = False) -> onnx.ModelProto:
    """The ONNX model of the BERT checkpoint in ``model_dir`` (config.json, model.safetensors).

    With ``with_mlm_head`` the graph also outputs the SPLADE vector; the head's
    transform is used when the checkpoint has it, and the decoder is tied to the
    word embeddings when it has no decoder matrix of its own.
    """
    config = BertConfig.from_file(model_dir / "config.json")
    weights = _Weights(model_dir / "model.safetensors")
    g = _GraphBuilder()
    hidden, heads = config.hidden_size, config.num_heads
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hidden // heads

    # Embeddings: word + position + token type, then LayerNorm.
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("axis1", np.array(1, np.int64))], "seq_len")
    positions = g.op(
        "Range", [g.const("zero", np.array(0, np.int64)), seq_len, g.const("one", np.array(1, np.int64))], "positions"
    )
    word = g.op("Gather", [g.const("word_emb", weights("embeddings.word_embeddings.weight")), "input_ids"], "word")
    position = g.op("Gather", [g.const("pos_emb", weights("embeddings.position_embeddings.weight")), positions], "pos")
    token_type = g.op(
        "Gather", [g.const("type_emb", weights("embeddings.token_type_embeddings.weight")), "token_type_ids"], "type"
    )
    summed = g.op("Add", [g.op("Add", [word, position]), token_type], "emb_sum")
    x = g.layer_norm(
        summed,
        *weights.pair("embeddings.LayerNorm"),
        config.layer_norm_eps,
        "emb_ln",
    )

    # Additive mask [batch, seq]: 0 for tokens, MASK_NEGATIVE for padding; [batch, 1, 1, seq] for attention.
    mask_float = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_float], "mask_inv")
    additive_mask = g.op("Mul", [inverted, g.const("neg", np.array(MASK_NEGATIVE, np.float32))], "mask_add")
    mask_bias = g.op("Unsqueeze", [additive_mask, g.const("ax12", np.array([1, 2]))], "mask_bias")
    split_heads = g.const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    def add_and_norm(sublayer: str, residual: str, norm: str, hint: str) -> str:
        """Post-LayerNorm residual block: LayerNorm(sublayer + residual)."""
        return g.layer_norm(g.op("Add", [sublayer, residual]), *weights.pair(norm), config.layer_norm_eps, hint)

    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."

        def heads_of(name: str, perm: list[int], x: str = x, p: str = p, i: int = i) -> str:
            projected = g.linear(x, *weights.pair(f"{p}attention.self.{name}"), f"l{i}.{name}")
            return g.op("Transpose", [g.op("Reshape", [projected, split_heads])], f"l{i}.{name}_t", perm=perm)

        query = heads_of("query", [0, 2, 1, 3])  # [b, h, s, d]
        key = heads_of("key", [0, 2, 3, 1])  # [b, h, d, s]
        value = heads_of("value", [0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [query, key]), scale]), mask_bias], f"l{i}.scores")
        probs = g.op("Softmax", [scores], f"l{i}.probs", axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, value])], f"l{i}.ctx", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads], f"l{i}.ctx_merged")
        attended = g.linear(context, *weights.pair(f"{p}attention.output.dense"), f"l{i}.attn_out")
        x = add_and_norm(attended, x, f"{p}attention.output.LayerNorm", f"l{i}.attn_ln")
        inner = g.op("Gelu", [g.linear(x, *weights.pair(f"{p}intermediate.dense"), f"l{i}.ffn_in")], f"l{i}.gelu")
        outer = g.linear(inner, *weights.pair(f"{p}output.dense"), f"l{i}.ffn_out")
        x = add_and_norm(outer, x, f"{p}output.LayerNorm", f"l{i}.ffn_ln")

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])]
    if with_mlm_head:
        _append_splade_head(g, weights, config, x, additive_mask)
        outputs.append(helper.make_tensor_value_info("splade", TensorProto.FLOAT, ["batch", config.vocab_size]))

    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    graph = helper.make_graph(g.nodes, "braid_bert", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="braid")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _append_splade_head(g: _GraphBuilder, weights: _Weights, config: BertConfig, x: str, additive_mask: str) -> None:
    """MLM logits -> log(1 + relu) -> max over non-padding positions, as output ``splade``."""
    if weights.has("cls.predictions.transform.dense.weight"):
        x = g.linear(
            x,
            *weights.pair("cls.predictions.transform.dense"),
            "mlm.transform",
        )
        x = g.layer_norm(
            g.op("Gelu", [x], "mlm.gelu"),
            *weights.pair("cls.predictions.transform.LayerNorm"),
            config.layer_norm_eps,
            "mlm.ln",
        )
    decoder = (
        weights("cls.predictions.decoder.weight")
        if weights.has("cls.predictions.decoder.weight")
        else weights("embeddings.word_embeddings.weight")
    )
    bias = (
        weights("cls.predictions.bias")
        if weights.has("cls.predictions.bias")
        else np.zeros(config.vocab_size, np.float32)
    )
    logits = g.linear(x, decoder, bias, "mlm.logits")  # [b, s, vocab]
    # log(1 + relu(.)) is non-decreasing, so max_t of it equals it applied to max_t of the logits:
    # pool first, with padding pushed to MASK_NEGATIVE, and only one [b, s, vocab] copy is made.
    masked = g.op("Add", [logits, g.op("Unsqueeze", [additive_mask, g.const("ax2", np.array([2]))])], "mlm.masked")
    pooled = g.op("ReduceMax", [masked, g.const("ax1", np.array([1]))], "mlm.pooled", keepdims=0)
    activated = g.op("Add", [g.op("Relu", [pooled]), g.const("one_f", np.array(1.0, np.float32))], "mlm.act")
    g.nodes.append(helper.make_node("Log", [activated], ["splade"]))
