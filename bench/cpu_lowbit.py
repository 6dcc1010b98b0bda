"""--low-bit on the CPU, side by side in one run: for each format, the worker's RSS once it
is ready, then `tokenrelay bench --modes stack` (API + Redis + that worker, defaults
otherwise) at 1 and 8 streams.

    python bench/cpu_lowbit.py [--formats float32,sym_int8,asym_int4,sym_int4]
        [--concurrency 1,8] [--prompt-len 128] [--output-len 128] [--out DIR]

The model is the demo's SmolLM2-135M-Instruct. Results: DIR/cpu-lowbit-FORMAT.json (the
bench's rows) and DIR/cpu-lowbit.json (all of them, with RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import redis

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.demo_model import demo_model_path
from tokenrelay.embedded_redis import EmbeddedRedis


def worker_rss(model: str, fmt: str) -> float:
    """MiB of resident memory of a ready worker serving ``model`` in ``fmt``."""
    server = EmbeddedRedis().start()
    low_bit = [] if fmt == "float32" else ["--low-bit", fmt]
    argv = tokenrelay_argv("worker", "--model-path", model, "--redis-url", server.url, *low_bit)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 300
        while not client.smembers("tr:workers"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {fmt} worker did not start: {' '.join(argv)}")
            time.sleep(0.2)
        time.sleep(2)  # past start-up's transient allocations
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kib / 1024
    finally:
        proc.terminate()
        proc.wait(60)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="float32,sym_int8,asym_int4,sym_int4")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompt-len", default="128")
    parser.add_argument("--output-len", default="128")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    model = str(demo_model_path())
    out = Path(args.out)
    everything = []
    for fmt in args.formats.split(","):
        rss = worker_rss(model, fmt)
        print(f"{fmt}: worker RSS {rss:.0f} MiB", flush=True)
        result = out / f"cpu-lowbit-{fmt}.json"
        low_bit = [] if fmt == "float32" else ["--low-bit", fmt]
        subprocess.run(
            tokenrelay_argv(
                "bench",
                "--model-path",
                model,
                "--device",
                "cpu",
                "--modes",
                "stack",
                "--concurrency",
                args.concurrency,
                "--prompt-len",
                args.prompt_len,
                "--output-len",
                args.output_len,
                *low_bit,
                "--out",
                str(result),
            ),  # fmt: skip
            check=True,
        )
        for row in json.loads(result.read_text()):
            everything.append({"format": fmt, "worker_rss_mib": round(rss), **row})
    (out / "cpu-lowbit.json").write_text(json.dumps(everything, indent=1))
    for row in everything:
        keys = ("format", "concurrency", "tok_s", "ttft_p50_ms", "itl_p50_ms")
        print({k: row.get(k) for k in keys} | {"rss_mib": row["worker_rss_mib"]})


if __name__ == "__main__":
    main()
