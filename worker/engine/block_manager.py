"""Fixed-size KV blocks: reference counts, per-sequence block tables, and the prefix cache.

Prefix caching: a full block is named by a hash chain, hash(parent block's hash, its block_size token
ids) (blake2b, 128 bits; the first block's parent is b""), registered when its tokens have been
computed (`commit`). A new sequence reuses the longest chain of registered blocks that covers its
prompt (`reuse`), so only the rest is prefilled; at least one token is always left to compute so
the step has logits to sample. Nothing identifies the model in the hash: one BlockManager serves one
engine (one model, one replica), so no two models can share it.

Invariants: every block id is either free (ref_count 0) or referenced by sequences (ref_count = the
number of block tables holding it); `num_free + num_used == num_blocks` at all times. Free blocks are
of two kinds: `free` (no hash; handed out first) and `cached` (a known hash, least-recently-freed
first): a cached block keeps its KV and hash until the manager needs a block and none is uncached;
then the least-recently-used one is evicted (its hash forgotten). A block still referenced is never
evicted. Beams of one request share their full prompt blocks (ref_count = number of beams holding
it); a block still being written is held by one sequence only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from worker.engine.sequence import Sequence


def block_hash(parent: bytes, tokens) -> bytes:
    """The chain hash of a full block with `tokens`, after the block whose hash is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # free blocks without a hash
        self.cached: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks  # a full, computed block's chain hash
        self.by_hash: dict[bytes, int] = {}  # chain hash -> the block registered under it
        self.queries = 0  # prompt tokens looked up (counters for EngineStats)
        self.hits = 0  # of them found cached
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose KV is known by hash (free or in use)."""
        return len(self.by_hash)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def _take(self) -> int:
        if self.free:
            return self.free.popleft()
        b, _ = self.cached.popitem(last=False)  # evict the least recently used cached block
        self._forget(b)
        self.evictions += 1
        return b

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]
        self.hash_of[b] = None

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free} free")
        for _ in range(n):
            b = self._take()
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def _chain(self, seq: Sequence, upto: int) -> list[bytes]:
        """Chain hashes of seq's first `upto` full blocks (those already committed are reused)."""
        bs, out = self.block_size, []
        parent = b""
        for i in range(upto):
            h = self.hash_of[seq.block_table[i]] if i < seq.num_hashed else None
            if h is None:
                h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            out.append(h)
            parent = h
        return out

    def reuse(self, seq: Sequence, limit: int | None = None) -> int:
        """A sequence with no blocks takes the longest chain of cached blocks covering its tokens
        (all but the last: one token is always computed; at most `limit` tokens). Returns the tokens reused (set them as
        its num_computed). Undo with `release` (the blocks return to the cache)."""
        if seq.block_table or seq.num_computed:
            raise RuntimeError("reuse: the sequence already holds blocks")
        n = len(seq.token_ids)
        self.queries += n
        if not self.prefix_caching:
            return 0
        bs, parent = self.block_size, b""
        for i in range(min(n - 1, n if limit is None else limit) // bs):
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            b = self.by_hash.get(h)
            if b is None:
                break
            if self.ref_count[b] == 0:
                del self.cached[b]
            self.ref_count[b] += 1
            seq.block_table.append(b)
            parent = h
        seq.num_hashed = len(seq.block_table)
        got = seq.num_hashed * bs
        self.hits += got
        return got

    def unreuse(self, seq: Sequence) -> None:
        """Undo a `reuse` whose admission did not fit (the counters too)."""
        self.queries -= len(seq.token_ids)
        self.hits -= len(seq.block_table) * self.block_size
        self.release(seq)
        seq.num_computed = 0

    def commit(self, seq: Sequence) -> None:
        """Register seq's full, computed blocks under their chain hashes (after a step advanced it)."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= seq.num_hashed:
            return
        hashes = self._chain(seq, full)
        for i in range(seq.num_hashed, full):
            b, h = seq.block_table[i], hashes[i]
            if self.hash_of[b] is None:
                self.hash_of[b] = h
                self.by_hash.setdefault(h, b)  # a twin block with the same tokens stays unregistered
        seq.num_hashed = full

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free seq's blocks past the first ceil(num_tokens / block_size): the slots of speculative
        tokens the target rejected. Those blocks were allocated for this step, are held by seq alone
        and have no hash (commit registers only blocks full of computed, accepted tokens)."""
        keep = max(-(-num_tokens // self.block_size), seq.num_hashed)
        while len(seq.block_table) > keep:
            b = seq.block_table.pop()
            if self.ref_count[b] != 1 or self.hash_of[b] is not None:
                raise RuntimeError(f"truncate: block {b} is shared or hashed")
            self.ref_count[b] = 0
            self.free.appendleft(b)  # handed out again first: no cached KV is evicted for it

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int | None = None) -> int:
        """child shares the parent's blocks that are full within its first `num_tokens` tokens (default:
        all it has computed). A partly filled block is never shared: it is still written to, so the child
        recomputes those tokens into a block of its own. Returns how many tokens the child shares."""
        n = parent.num_computed if num_tokens is None else num_tokens
        full = min(n // self.block_size, len(parent.block_table))
        self.release(child)
        child.block_table = parent.block_table[:full]
        child.num_hashed = min(parent.num_hashed, full)
        for b in child.block_table:
            self.ref_count[b] += 1
        return full * self.block_size

    def check(self, tables: list[list[int]]) -> None:
        """Invariant check for tests: `tables` (every live block table) hold exactly the used blocks."""
        counts = [0] * self.num_blocks
        for table in tables:
            for b in table:
                counts[b] += 1
        if counts != self.ref_count:
            raise AssertionError("block reference counts disagree with the live block tables")
        if sorted(list(self.free) + list(self.cached)) != [b for b in range(self.num_blocks) if counts[b] == 0]:
            raise AssertionError("free list disagrees with the live block tables")
        if any(self.hash_of[b] is None for b in self.cached) or any(self.hash_of[b] is not None for b in self.free):
            raise AssertionError("a free block's hash disagrees with its list")
        if any(self.hash_of[b] != h for h, b in self.by_hash.items()):
            raise AssertionError("the hash index disagrees with the blocks' hashes")

    def release(self, seq: Sequence) -> None:
        # the last blocks go to the LRU end first: a chain's tail is evicted before its head, which
        # more requests share
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.hash_of[b] is not None and self.by_hash.get(self.hash_of[b]) == b:
                    self.cached[b] = None
                else:
                    self.hash_of[b] = None
                    self.free.append(b)
            elif self.ref_count[b] < 0:
                raise RuntimeError(f"block {b} released twice")
        seq.block_table = []
        seq.num_hashed = 0
