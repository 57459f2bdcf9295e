"""Shared test fixtures: the real CT scans in ../shared/data/ct (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CTGRIDIT_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))


def data_file(relative: str) -> Path:
    """A file of the shared CT data, or skip the test with the reason."""
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"shared CT data not found at {path} (set CTGRIDIT_TEST_DATA)")
    return path


@pytest.fixture
def dicom_dir() -> Path:
    return data_file("totalsegmentator/example_ct_dicom")


@pytest.fixture
def small_ct() -> Path:
    """A small real abdomen slab, 122 x 101 x 30 at 3 mm, RAS."""
    return data_file("totalsegmentator/example_ct_sm.nii.gz")


@pytest.fixture
def chest_ct() -> Path:
    """A real chest crop, 122 x 102 x 112 at 1.5 mm, LPS."""
    return data_file("totalsegmentator/chest_crop.nii.gz")
