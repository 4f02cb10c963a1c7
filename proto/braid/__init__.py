"""Braid: a hybrid (sparse + dense) search service.

The importable package ``braid`` is assembled from the repository's top-level
folders: ``braid.service`` (service/), ``braid.index`` (index/),
``braid.encoders`` (encoders/) and ``braid.v1`` (code generated from
proto/braid/v1/*.proto by the install step).
"""

__version__ = "0.1.0"
