"""The collection the framework adapters make when it is missing: one text field for the
document text (BM25 indexes it) and one dense field, filled by the server's encoder
``encoder_model`` from that text, or by vectors of ``dim`` the client sends.

Shared by braid.integrations.langchain and braid.integrations.llamaindex (imports no framework).
"""

from __future__ import annotations

from braid.v1 import braid_pb2 as pb

METRICS = {"cosine": pb.COSINE, "dot": pb.DOT, "l2": pb.L2}


def collection_schema(
    text_field: str = "text",
    dense_field: str = "emb",
    dim: int = 0,
    metric: str = "cosine",
    encoder_model: str | None = None,
) -> pb.Schema:
    """The schema an adapter creates: one text field, one dense field (with the server's
    encoder ``encoder_model`` over the text field, or ``dim`` client-side vectors)."""
    field = pb.DenseVectorField(name=dense_field, dim=dim, metric=METRICS[metric])
    if encoder_model:
        field.encoder.CopyFrom(pb.Encoder(model=encoder_model, source_fields=[text_field]))
    return pb.Schema(text_fields=[pb.TextField(name=text_field)], dense_fields=[field])
