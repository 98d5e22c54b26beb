"""Shared fixtures for the pipeline.data tests (offline, small, fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # allow plain `pytest` without installing the package
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.data.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def small_demo():
    from pipeline.data.demo import generate_demo_data

    return generate_demo_data(seed=3, n_train=300, n_validation=50, n_test=50,
                              n_text_train=200, n_text_validation=30, n_text_test=30)
