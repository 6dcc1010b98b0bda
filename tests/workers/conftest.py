from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="session")
def model_and_tokenizer(demo_model: Path):  # type: ignore[no-untyped-def]
    """The real SmolLM2-135M-Instruct, loaded once for every engine test."""
    return AutoModelForCausalLM.from_pretrained(demo_model), AutoTokenizer.from_pretrained(
        demo_model
    )
