"""Shared pytest fixtures: where the read-only reference data lives."""
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f'reference data folder {SHARED} is not present')
    return SHARED


@pytest.fixture(scope='session')
def sintel(shared) -> Path:
    return shared / 'data' / 'sintel'


@pytest.fixture(scope='session')
def official_fixtures(shared) -> Path:
    return shared / 'fixtures' / 'official_cmp'
