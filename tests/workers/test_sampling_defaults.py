"""The model's generation_config fills the sampling fields a request leaves out (vLLM's
rule), and the demo model's folder carries the sampling its model card recommends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import GenerationConfig

from tokenrelay.demo_model import GENERATION_DEFAULTS, write_generation_defaults
from tokenrelay.queueing.messages import SamplingParams
from tokenrelay.workers.loader import generation_defaults
from tokenrelay.workers.sampling import defaults_from, with_defaults


def test_defaults_from_reads_the_fields_tokenrelay_samples_with() -> None:
    config = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    assert defaults_from(config) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert defaults_from({"bos_token_id": 1}) == {}
    assert defaults_from({"top_k": -1}) == {"top_k": 0}  # -1: no filter, as 0 is here


def test_defaults_from_skips_values_a_client_could_not_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert defaults_from({"temperature": 5.0, "top_p": 0.0, "top_k": 40}) == {"top_k": 40}
    assert "temperature=5.0" in caplog.text


def test_with_defaults_fills_only_what_the_request_left_out() -> None:
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
    filled = with_defaults(SamplingParams(max_tokens=4), defaults)
    assert (filled.temperature, filled.top_p, filled.top_k, filled.max_tokens) == (0.2, 0.9, 50, 4)

    # given explicitly, even at the old fixed default, it is the client's choice
    asked = with_defaults(SamplingParams(temperature=1.0, top_k=0), defaults)
    assert (asked.temperature, asked.top_p, asked.top_k) == (1.0, 0.9, 0)
    greedy = with_defaults(SamplingParams(temperature=0), defaults)
    assert greedy.temperature == 0

    plain = SamplingParams(max_tokens=4)
    assert with_defaults(plain, {}) is plain  # a model without defaults: the fallbacks


def test_with_defaults_through_the_wire() -> None:
    """The worker sees what the API left out once the job has crossed Redis as JSON."""
    sent = SamplingParams(top_p=0.5)
    received = SamplingParams.model_validate_json(sent.model_dump_json())
    filled = with_defaults(received, {"temperature": 0.2, "top_p": 0.9})
    assert (filled.temperature, filled.top_p) == (0.2, 0.5)


class _Model:
    def __init__(self, config: GenerationConfig | None) -> None:
        self.generation_config = config


def test_generation_defaults_of_a_loaded_model() -> None:
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, bos_token_id=1)
    assert generation_defaults(_Model(config)) == {"temperature": 0.7, "top_p": 0.8}
    assert generation_defaults(_Model(GenerationConfig(bos_token_id=1))) == {}
    assert generation_defaults(_Model(None)) == {}


def test_write_generation_defaults_keeps_what_the_folder_has(tmp_path: Path) -> None:
    """Bug: the converted demo folder had no sampling defaults, so a request without a
    temperature sampled at 1.0 and often missed "Paris". A folder converted before the fix
    gets them on the next start; the token ids transformers saved stay."""
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_generation_defaults(tmp_path)
    assert json.loads(path.read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        **GENERATION_DEFAULTS,
    }

    path.write_text(json.dumps({"temperature": 0.5}))  # the user's own choice stays
    write_generation_defaults(tmp_path)
    assert json.loads(path.read_text()) == {"temperature": 0.5}

    path.unlink()
    write_generation_defaults(tmp_path)
    assert json.loads(path.read_text()) == GENERATION_DEFAULTS


def test_demo_model_has_the_model_cards_sampling(demo_model: Path) -> None:
    config = GenerationConfig.from_pretrained(demo_model)
    assert generation_defaults(_Model(config)) == {"temperature": 0.2, "top_p": 0.9}
