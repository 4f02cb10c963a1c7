"""Server configuration: typed, loaded once from flags and ``BRAID_*`` environment variables.

Precedence: command-line flag, then environment variable, then default.

| setting            | env                      | default      |
|--------------------|--------------------------|--------------|
| data_dir           | BRAID_DATA_DIR           | ./braid-data |
| host               | BRAID_HOST               | 127.0.0.1    |
| port               | BRAID_PORT               | 50051        |
| workers            | BRAID_WORKERS            | 16           |
| max_message_bytes  | BRAID_MAX_MESSAGE_BYTES  | 64 MiB       |
| max_batch          | BRAID_MAX_BATCH          | 10000        |
| max_limit          | BRAID_MAX_LIMIT          | 10000        |
| models_dir         | BRAID_MODELS_DIR         | <data_dir>/models |
| encoder_threads    | BRAID_ENCODER_THREADS    | 0 = one per CPU |
| encoder_max_batch  | BRAID_ENCODER_MAX_BATCH  | 32           |
| encoder_max_wait_ms| BRAID_ENCODER_MAX_WAIT_MS| 2            |

The encoder settings: ONNX Runtime intra-op threads per model, the most texts in
one model call, and how long the micro-batcher waits for concurrent queries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from braid.index.validate import Limits

DEFAULT_DATA_DIR = "./braid-data"


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 16
    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 10_000
    max_limit: int = 10_000
    models_dir: Path | None = None
    encoder_threads: int = 0
    encoder_max_batch: int = 32
    encoder_max_wait_ms: int = 2
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.encoder_threads < 0 or self.encoder_max_batch < 1 or self.encoder_max_wait_ms < 0:
            raise ValueError("encoder_threads >= 0, encoder_max_batch >= 1 and encoder_max_wait_ms >= 0 are required")
        object.__setattr__(
            self, "limits", Limits(max_batch=self.max_batch, max_limit=self.max_limit, max_depth=self.max_limit)
        )

    @property
    def models_path(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_config(**overrides: object) -> ServerConfig:
    """Build the config from BRAID_* variables, with non-None overrides (flags) taking precedence."""
    values: dict[str, object] = {}
    for f in fields(ServerConfig):
        if not f.init:
            continue
        env = os.environ.get(f"BRAID_{f.name.upper()}")
        value = overrides.get(f.name)
        if value is None and env is not None:
            value = env
        if value is None:
            continue
        if f.name in ("data_dir", "models_dir"):
            values[f.name] = Path(str(value))
        elif f.name == "host":
            values[f.name] = str(value)
        else:
            try:
                values[f.name] = int(value)  # type: ignore[call-overload]
            except ValueError:
                raise ValueError(f"{f.name} (BRAID_{f.name.upper()}) must be an integer, got {value!r}") from None
    return ServerConfig(**values)  # type: ignore[arg-type]
