#!/usr/bin/env bash
# On the lent GPU machine: the same `tokenrelay bench` against two checkouts in one lease,
# the older one from a copy in .old/ (git archive COMMIT | tar -x -C .old), then this one.
#   bash bench/ab_stack.sh OUTDIR BENCH-ARGS...
set -uo pipefail
out=$1; shift
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
for side in old head; do
  src=.; [ $side = old ] && src=.old
  rm -rf /tmp/tr-$side build .old/build
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tr-$side $src >/dev/null
  (cd /tmp && PYTHONPATH=/tmp/tr-$side:/tmp/site PATH=/tmp/tr-$side/bin:$PATH \
     timeout 290 python3 -P -m tokenrelay bench "$@" --out "$out/$side.json") > "$out/$side.log" 2>&1
  echo "$side rc=$?"; grep "^\[bench\] {" "$out/$side.log"
done
