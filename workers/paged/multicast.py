"""NVLink multicast (NVLS) stays off in every process a split worker starts: NCCL's,
symmetric memory's and NVSHMEM's. Set before the ranks' processes exist, so each inherits it
(ranks.py sets it again as a rank starts)."""

from __future__ import annotations

import os

NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_multicast() -> None:
    os.environ.update(NO_MULTICAST)
