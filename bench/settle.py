"""bench/ scripts' name for loadtest/settle.py (``from settle import settle``): one idle wait for both."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's loadtest/, when run from bench/
from loadtest.settle import IDLE_SHARE, settle

__all__ = ["IDLE_SHARE", "settle"]
