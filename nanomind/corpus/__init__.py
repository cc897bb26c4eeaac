"""Dataset tools: fetch public corpora, read any text format, clean and deduplicate, mix with weights.

    nanomind data get minimind/pretrain_hq.jsonl --out data/raw
    nanomind data convert --data raw.parquet --to pretrain --out data/raw.jsonl
    nanomind data clean --data data/raw/*.jsonl --out data/clean
    nanomind data mix --spec mix.toml --out data/mix

The optional packages these need (datasketch, pyarrow, opencc) come with `pip install 'nanomind[data]'`.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, why: str) -> ModuleType:
    """Import an optional dependency, or fail with a ValueError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"{why} needs the `{package}` package: pip install {package}  (or pip install 'nanomind[data]')"
        ) from None
