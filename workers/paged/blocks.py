"""The block manager: which cache blocks each sequence owns.

The KV cache is cut into blocks of ``block_size`` token positions. A sequence holds a block
table (block ids in position order) and takes one more block each time it grows past the
last one; its blocks go back when it ends or is preempted. Blocks are reference counted, so
the ``n`` choices of one request share their prompt's full blocks (and prefix caching can
share them between requests later); a shared block is never written, because a sequence
only ever writes the positions past its shared prefix, in blocks of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """Not enough free blocks for what was asked; nothing was taken."""


def cache_row(blocks: list[int], position: int, block_size: int) -> int:
    """The cache row (block * block_size + offset) holding ``position`` of a sequence
    whose block table is ``blocks``."""
    return blocks[position // block_size] * block_size + position % block_size


@dataclass
class BlockTable:
    """One sequence's blocks, in position order."""

    blocks: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the cache needs at least one block of one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: a freed block is reused first, while it is still in L2.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_hold(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, table: BlockTable, tokens: int) -> None:
        """Grow ``table`` until it covers ``tokens`` positions (all or nothing)."""
        need = self.blocks_for(tokens) - len(table.blocks)
        if need <= 0:
            return
        if need > len(self._free):
            raise OutOfBlocks(f"{need} blocks wanted, {len(self._free)} free")
        for _ in range(need):
            block = self._free.pop()
            self._refs[block] = 1
            table.blocks.append(block)

    def fork(self, table: BlockTable, tokens: int) -> BlockTable:
        """A new table sharing ``table``'s full blocks among its first ``tokens``
        positions; the partly filled last block is copied by the caller into a block
        of the new table's own (see ``allocate``)."""
        shared = table.blocks[: tokens // self.block_size]
        for block in shared:
            self._refs[block] += 1
        return BlockTable(list(shared))

    def free(self, table: BlockTable) -> None:
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
            elif self._refs[block] < 0:
                raise RuntimeError(f"block {block} freed more often than taken")
        table.blocks.clear()

    def check(self) -> None:
        """Every block is either free (no owner) or owned, never both; for tests."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block, refs in enumerate(self._refs):
            if (refs == 0) != (block in free):
                raise AssertionError(f"block {block}: {refs} owners, free={block in free}")
