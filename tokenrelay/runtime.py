"""The runtime file `tokenrelay serve` leaves while it runs, so the other commands find it.

serve's Redis listens on a free port that only serve knows; `status`, `worker`, `chat`,
`ui` and `bench` read that port (and the API's URL) from here when no ``--redis-url`` /
``--api-url`` (nor its ``TOKENRELAY_`` variable) is given.

One JSON file per running serve, ``serve-<pid>.json``, in ``$TOKENRELAY_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/tokenrelay``, else ``<cache>/run`` (``~/.cache/tokenrelay/run``, or
``$TOKENRELAY_CACHE/run``). serve removes its file when it stops; a file whose serve
process is gone (serve was killed) is ignored. With several serves running, the newest wins.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_API_URL = "http://127.0.0.1:8000/v1"


@dataclass
class ServeInfo:
    redis_url: str
    api_url: str  # the OpenAI base URL, ending in /v1
    ui_url: str | None
    model: str
    model_path: str
    pid: int = field(default_factory=os.getpid)  # serve's own
    pids: dict[str, int] = field(default_factory=dict)  # its children's, by name
    started_at: float = 0.0


def runtime_dir() -> Path:
    if os.environ.get("TOKENRELAY_RUNTIME_DIR"):
        return Path(os.environ["TOKENRELAY_RUNTIME_DIR"]).expanduser()
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "tokenrelay"
    from .demo_model import cache_dir

    return cache_dir() / "run"


def path_for(pid: int) -> Path:
    return runtime_dir() / f"serve-{pid}.json"


def write(info: ServeInfo) -> Path:
    """Write (or rewrite) ``info``'s file; readers never see half of it."""
    path = path_for(info.pid)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove(pid: int) -> None:
    path_for(pid).unlink(missing_ok=True)


def running() -> ServeInfo | None:
    """The newest serve whose process is alive, if any."""
    found = []
    for path in runtime_dir().glob("serve-*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            info = ServeInfo(**json.loads(path.read_text()))
            if _alive(info.pid):
                found.append(info)
    return max(found, key=lambda i: i.started_at, default=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the PID
        return False
    return True


def redis_url(given: str | None) -> str:
    """``given`` (a flag or its variable), else the running serve's Redis, else localhost."""
    if given:
        return given
    info = running()
    return info.redis_url if info else DEFAULT_REDIS_URL


def api_url(given: str | None) -> str:
    """``given``, else the running serve's API, else localhost:8000; ends in /v1 as given."""
    if given:
        return given
    info = running()
    return info.api_url if info else DEFAULT_API_URL
