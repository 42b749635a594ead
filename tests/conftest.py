from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures (small committed models and tokenizers; rebuilt by tools/make_fixtures.py)."""
    return FIXTURES
