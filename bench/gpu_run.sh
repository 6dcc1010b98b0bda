#!/usr/bin/env bash
# On the lent GPU machine, from the repo root: install the carried wheels and this checkout
# into /tmp, then run what is asked: `bash bench/gpu_run.sh check|bench|py|tests ARGS...`.
set -euo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/tr build; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tr . >/dev/null
export PYTHONPATH=/tmp/tr:/tmp/site PATH=/tmp/tr/bin:$PATH
what=$1; shift
case $what in
  check) python3 bench/paged_gpu_check.py ;;
  bench) python3 -P -m tokenrelay bench "$@" ;;
  py) python3 -P "$@" ;;
  tests)  # from a copy, so that the checkout's tokenrelay/ does not shadow the installed one
    rm -rf /tmp/tt && mkdir /tmp/tt && cp -r tests pyproject.toml /tmp/tt/ && cd /tmp/tt
    python3 -m pytest -p no:cacheprovider -q "$@" ;;
esac
