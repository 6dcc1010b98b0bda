"""`tokenrelay bench`: the table's rows name what they measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenrelay.bench import run
from tokenrelay.bench.stats import summarize
from tokenrelay.cli import build_parser


def test_http_rows_are_labelled_with_the_model_they_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Bug: `bench --modes http` labelled its rows `random:1b` (the --model-path default,
    which mode http never loads) whatever model the server ran."""
    asked: list[str] = []

    def measure(url, model, workload, concurrency, args, mode):  # type: ignore[no-untyped-def]
        asked.append(model)
        return summarize([], mode, concurrency)

    monkeypatch.setattr(run, "_measure_http", measure)
    out = tmp_path / "bench.json"
    argv = ["bench", "--modes", "http", "--api-url", "http://127.0.0.1:9", "--concurrency", "1,2"]
    run.run(build_parser().parse_args([*argv, "--model-name", "SmolLM2", "--out", str(out)]))
    assert asked == ["SmolLM2", "SmolLM2"]
    assert [row["model"] for row in json.loads(out.read_text())] == ["SmolLM2", "SmolLM2"]
    assert "SmolLM2" in out.with_suffix(".md").read_text()
