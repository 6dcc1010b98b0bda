"""The OpenAI error shape, checked the same way by every test that expects an error."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI error with this status (and code); returns the error."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if code is not None:
        assert err["code"] == code, err
    return err
