"""On a CUDA machine: the paged runner's greedy tokens equal generate() for every
architecture family (tests/workers/test_paged_runner.py's gpu test, without pytest's
collection, so it runs against an installed tokenrelay)."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

path = Path(__file__).resolve().parent.parent / "tests" / "workers" / "test_paged_runner.py"
spec = importlib.util.spec_from_file_location("test_paged_runner", path)
assert spec and spec.loader
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
failed = 0
for name in sorted(module.ARCHITECTURES):
    try:
        module.test_greedy_tokens_equal_generate_on_cuda(name)
        print(f"cuda greedy == generate(): {name} ok", flush=True)
    except Exception:
        failed += 1
        print(f"cuda greedy == generate(): {name} FAILED", flush=True)
        traceback.print_exc()
print(f"{len(module.ARCHITECTURES) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
