"""Fixtures for the model pipeline's tests: tiny random GPT-2 and Llama bundles, built once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models"))

from wasmlm_models import bundle  # noqa: E402

BUILD = REPO / "build"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real default model (minutes); runs in CI")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for ref in ("tiny-gpt2", "tiny-llama"):
        bundle.build(ref, root / ref)
        out[ref] = root / ref
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())
