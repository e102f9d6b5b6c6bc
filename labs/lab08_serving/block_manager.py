"""A paged KV cache's memory manager: fixed-size blocks, per-sequence block tables, reference counts, copy-on-write.

What it saves: a contiguous cache reserves max_seq_len token slots per request before knowing how long it will run,
and most of them stay empty (kv_arithmetic.py measures it). Here the cache is a pool of `num_blocks` blocks of
`block_size` token slots each; a sequence takes blocks as it grows, so it wastes at most block_size - 1 slots (in its
last block), and sequences can share blocks instead of holding copies.

PagedAttention, Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180, Sections 4.2-4.4, as a virtual-memory system:

    logical block j of a sequence (its tokens j*bs .. j*bs + bs - 1) lives in physical block table[j]
    token p lives in row table[p // bs] * bs + p % bs of the flat cache (model_runner.slot_mapping)
    every block has a reference count: fork() shares all of a parent's blocks (parallel sampling); a sequence about
    to write into a shared, partly filled block first copies it (copy-on-write) and writes into its own copy.

Prefix caching (vLLM's automatic prefix caching; SGLang's RadixAttention, Zheng et al. 2023, arXiv:2312.07104, keeps a
radix tree instead): a *full* block is named by a hash of its tokens and of every token before it,

    h_j = sha256(h_{j-1} || tokens of block j),     h_{-1} = b""

so prompts that share a prefix share its blocks, and their K/V is computed once. A freed block keeps its name while it
waits in the free list; a later prompt with the same prefix revives it, until the block is handed out for other tokens.
The free list is a queue: the least recently freed block is reused first, and a sequence frees its last block first
(its tail is the part least likely to be shared). The last prompt token is never taken from the cache: the model must
run on it to produce the logits of the first output token.

Usage:
    manager = BlockManager(BlockManagerConfig(num_blocks=64, block_size=16))
    cached = manager.allocate(0, prompt_token_ids)     # blocks for the prompt; how many of its tokens are cached
    copy = manager.append_token(0, token_id)           # room for one more token: None, or (src, dst) to copy first
    manager.free(0)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Config and errors


class CacheFullError(RuntimeError):
    """No free KV block is left: the scheduler preempts a sequence (or waits) before asking again."""


@dataclass(frozen=True, kw_only=True)
class BlockManagerConfig:
    """num_blocks: blocks in the pool. block_size: token slots per block. enable_prefix_caching: share full blocks
    by the hash of their prefix."""

    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def block_hash(prefix_hash: bytes, token_ids: list[int]) -> bytes:
    """h_j = sha256(h_{j-1} || tokens of block j): equal exactly when the block and everything before it are equal
    (a cryptographic hash, so a collision, which would silently mix two prompts' K/V, is not a practical risk)."""
    data = prefix_hash + b"|" + ",".join(str(t) for t in token_ids).encode()
    return hashlib.sha256(data).digest()


# -----------------------------------------------------------------------------
# The manager


class BlockManager:
    """Owns which physical block holds which sequence's tokens. It never touches the cache tensors themselves:
    the model runner writes K/V where the block tables say, and performs the copies that append_token returns.

    State (read it, do not write it from outside):
        ref_counts[b]       how many block tables hold block b (0: free)
        free_blocks         the free blocks, least recently freed first (an OrderedDict used as a queue)
        block_tables[s]     physical block of each logical block of sequence s
        token_ids[s]        the tokens whose K/V sequence s stores (or is about to: the step that allocated them)
        block_hashes[b]     the name of full block b (prefix caching)
        cached_blocks[h]    the block named h (prefix caching)
    """

    def __init__(self, config: BlockManagerConfig):
        self.config = config
        self.block_size = config.block_size
        self.ref_counts = [0] * config.num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(config.num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.block_hashes: dict[int, bytes] = {}
        self.cached_blocks: dict[bytes, int] = {}

    # ---- queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.config.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether allocate() of num_tokens tokens would succeed even if none of them is cached."""
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def can_append(self, seq_id: int) -> bool:
        """Whether append_token(seq_id, ...) would succeed: it needs a free block when the last block is full (a new
        block) or shared (a copy)."""
        tokens, table = self.token_ids[seq_id], self.block_tables[seq_id]
        needs_block = len(tokens) % self.block_size == 0 or self.ref_counts[table[-1]] > 1
        return self.num_free_blocks >= 1 or not needs_block

    # ---- allocation

    def allocate(self, seq_id: int, token_ids: list[int]) -> int:
        """Give a new sequence the blocks for its first tokens (a prompt; after a preemption, prompt + output).

        With prefix caching, leading full blocks whose name is cached are shared instead of allocated (their ref
        count grows); new full blocks are named so later prompts can share them.

        Args:
            seq_id: a sequence that holds no blocks.
            token_ids: its tokens, at least one.

        Returns:
            How many leading tokens are already in the cache (a multiple of block_size, less than len(token_ids)):
            the model computes K/V only for the rest. 0 without prefix caching.

        Raises:
            ValueError: seq_id already holds blocks, or token_ids is empty.
            CacheFullError: fewer free blocks than blocks_for(len(token_ids)); nothing is changed then.
        """
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already holds blocks: free it before allocating again")
        if len(token_ids) == 0:
            raise ValueError(f"sequence {seq_id}: cannot allocate an empty token list")
        if not self.can_allocate(len(token_ids)):
            raise CacheFullError(f"sequence {seq_id} needs {self.blocks_for(len(token_ids))} blocks, "
                                 f"{self.num_free_blocks} are free")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager.allocate is not implemented yet (lab08_serving/block_manager.py)")

    def append_token(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        """Make room for one more token of a sequence (the token fed to the model in this decode step).

        A full last block gets a new block after it; a partly filled last block that other sequences share is copied
        first (copy-on-write: this sequence moves to the copy, the others keep the original). With prefix caching, a
        block that this token fills gets its name.

        Args:
            seq_id: a sequence holding blocks.
            token_id: the token whose K/V will be written at position len(token_ids[seq_id]).

        Returns:
            None, or (src, dst): copy block src into block dst before writing (the runner does it).

        Raises:
            ValueError: seq_id holds no blocks.
            CacheFullError: a block is needed and none is free; nothing is changed then.
        """
        if seq_id not in self.block_tables:
            raise ValueError(f"sequence {seq_id} holds no blocks: allocate it first")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager.append_token is not implemented yet (lab08_serving/block_manager.py)")

    def fork(self, parent_id: int, child_id: int) -> None:
        """Let child_id share every block of parent_id (parallel sampling: n outputs of one prompt).

        Raises:
            ValueError: the parent holds no blocks, or the child already does.
        """
        if parent_id not in self.block_tables:
            raise ValueError(f"sequence {parent_id} holds no blocks: nothing to fork")
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already holds blocks")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager.fork is not implemented yet (lab08_serving/block_manager.py)")

    def free(self, seq_id: int) -> None:
        """Release every block of a finished (or preempted) sequence; a block whose count drops to 0 is free.

        Raises:
            ValueError: seq_id holds no blocks (never allocated, or freed twice).
        """
        if seq_id not in self.block_tables:
            raise ValueError(f"sequence {seq_id} holds no blocks: never allocated, or freed twice")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager.free is not implemented yet (lab08_serving/block_manager.py)")

    # ---- helpers

    def _take_free_block(self) -> int:
        """Pop the least recently freed block; it loses its name (its contents will be overwritten)."""
        if not self.free_blocks:
            raise CacheFullError(f"all {self.config.num_blocks} KV blocks are in use")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager._take_free_block is not implemented yet (lab08_serving/block_manager.py)")

    def _share(self, block: int) -> None:
        """One more table holds `block` (a prefix-cache hit); a free cached block leaves the free list."""
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager._share is not implemented yet (lab08_serving/block_manager.py)")

    def _release(self, block: int) -> None:
        """One table fewer holds `block`; at 0 it joins the end of the free list (keeping its name)."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} freed twice: its reference count is already 0")
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: BlockManager._release is not implemented yet (lab08_serving/block_manager.py)")

    def _name(self, block: int, name: bytes) -> None:
        """Record that full block `block` holds the tokens named `name` (the newest block of a name wins)."""
        self.block_hashes[block] = name
        self.cached_blocks[name] = block
