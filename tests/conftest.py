"""Shared fixtures: the real smollm2-135m model (loaded once) and the local data directory.

Tests never touch the Hugging Face hub: ``HF_HUB_OFFLINE=1`` is set here.  Data come from
``$LOWBIT_DATA_DIR``, defaulting to ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOWBIT_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(os.environ["LOWBIT_DATA_DIR"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.fail(f"evaluation data not found under LOWBIT_DATA_DIR={DATA_DIR}; point it at shared/data")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the real smollm2-135m in fp32, loaded once per session."""
    import torch

    from lowbit.models.loading import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")
