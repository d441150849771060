"""Shared fixtures: the real params.yaml, shrunk, and generated archives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as the user has it, as a plain dict for the test to shrink."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())
