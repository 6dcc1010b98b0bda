"""The embedding engine in-process: --task auto's detection, the folder's pooling, and a
decoder (the demo SmolLM2) pooled by its last token or by the mean, each against the same
pooling computed here with transformers; requests batched together get what each gets
alone."""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.workers.embed_build import build_embed_engine, detect_task
from tokenrelay.workers.engine import InvalidRequest
from tokenrelay.workers.pooling import Pooling, sentence_transformers_config

TEXTS = ["Hello there.", "Queues of jobs in Redis streams, read by a consumer group.", "x"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    from tokenrelay.embedding_model import embedding_model_path

    return embedding_model_path()


def _folder(tmp_path: Path, name: str, config: dict[str, Any]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_task_auto_detects_encoders(tmp_path: Path, minilm: Path, demo_model: Path) -> None:
    assert detect_task(str(minilm)) == "embed"  # a sentence-transformers folder
    assert detect_task(str(demo_model)) == "generate"  # LlamaForCausalLM
    bert = {"architectures": ["BertModel"], "model_type": "bert"}
    assert detect_task(_folder(tmp_path, "bert", bert)) == "embed"
    masked = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    assert detect_task(_folder(tmp_path, "mlm", masked)) == "embed"
    gpt = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    assert detect_task(_folder(tmp_path, "gpt", gpt)) == "generate"
    assert detect_task("model.gguf") == "generate"


def test_minilm_folder_declares_mean_pooling_normalized_256(minilm: Path) -> None:
    assert sentence_transformers_config(minilm) == Pooling("mean", True, 256)


def _args(path: Path, pooling: str | None) -> argparse.Namespace:
    return argparse.Namespace(
        model_path=str(path),
        engine="auto",
        low_bit=None,
        load_8bit=False,
        num_gpus=1,
        device="cpu",
        dtype="float32",
        trust_remote_code=False,
        pooling=pooling,
        max_model_len=None,
    )


def _job(inputs: list[Any], job_id: str = "e", dimensions: int | None = None) -> Job:
    return Job(
        id=job_id,
        model="m",
        kind="embed",
        input=inputs,
        dimensions=dimensions,
        params=SamplingParams(),
        stream=False,
        created=0,
        deadline=time.time() + 60,
    )


async def _embed(engine: Any, jobs: list[Job]) -> list[np.ndarray]:
    """Submit all at once (so the engine batches them together); their vectors."""
    handles = [engine.submit(job) for job in jobs]
    out = []
    for job, handle in zip(jobs, handles, strict=True):
        got: dict[int, np.ndarray] = {}
        async for events in handle.stream():
            for event in events:
                for d in event.deltas:
                    got[d.index] = np.frombuffer(base64.b64decode(d.embedding), "<f4")
        out.append(np.stack([got[i] for i in range(len(job.input or []))]))
    return out


def _reference(model: Any, tokenizer: Any, texts: list[str], mode: str) -> np.ndarray:
    vectors = []
    for text in texts:  # one at a time: no padding at all
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        vector = hidden[-1] if mode == "last" else hidden.mean(0)
        vectors.append(torch.nn.functional.normalize(vector, dim=0).numpy())
    return np.stack(vectors)


@pytest.mark.parametrize("mode", ["last", "mean"])
async def test_a_decoder_pooled_by_last_token_or_mean(demo_model: Path, mode: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    engine = build_embed_engine(_args(demo_model, mode))
    try:
        assert engine.pooling.mode == mode and engine.pooling.normalize  # type: ignore[attr-defined]
        together = await _embed(engine, [_job(TEXTS[:2], "a"), _job(TEXTS[2:], "b")])
    finally:
        engine.close()
    model = AutoModel.from_pretrained(demo_model).eval()
    expected = _reference(model, AutoTokenizer.from_pretrained(demo_model), TEXTS, mode)
    np.testing.assert_allclose(np.concatenate(together), expected, atol=1e-4)


async def test_refusals_come_before_any_vector(minilm: Path) -> None:
    engine = build_embed_engine(_args(minilm, None))
    try:
        for job in (_job(["x"], dimensions=10), _job([[5] * 300]), _job([[10**6]])):
            handle = engine.submit(job)
            with pytest.raises(InvalidRequest):
                async for _ in handle.stream():
                    pytest.fail("a refused job got a vector")
        ok = await _embed(engine, [_job(["fine"])])
        assert ok[0].shape == (1, 384)
        assert abs(float(np.linalg.norm(ok[0][0])) - 1.0) < 1e-5
    finally:
        engine.close()


def test_engine_is_closed_cleanly(minilm: Path) -> None:
    engine = build_embed_engine(_args(minilm, None))
    engine.close()
    assert not engine._thread.is_alive()  # type: ignore[attr-defined]
