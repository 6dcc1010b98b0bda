"""README's sample `tokenrelay status` output is what the command prints for README's sample
`GET /v1/status` document."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenrelay.queueing.status import Status
from tokenrelay.status import render

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE_NOW = 1764004000.0  # the samples' clock: 0.4 s after the first worker's heartbeat


def test_readme_status_sample_is_real_output() -> None:
    """Bug: the sample said `WORKERS 2` above a single worker row (and `1 workers`): the
    model rows must add up to the worker rows, as a real snapshot's do."""
    section = README.read_text().split("### Status: ", 1)[1]
    table, document = re.findall(r"^```(?:json)?\n(.*?)^```", section, re.M | re.S)[:2]
    status = Status.model_validate(json.loads(document))
    assert render(status, now=SAMPLE_NOW) == table.rstrip("\n")
    for model in status.models:
        serving = [w for w in status.workers if model.name in w.models]
        assert model.workers == len(serving)
        assert model.running + model.batch_running == sum(w.inflight for w in serving)
        assert model.tokens_per_s == round(sum(w.tokens_per_s for w in serving), 1)
