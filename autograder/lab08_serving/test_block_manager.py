"""Lab 08, part 2: the block manager (block_manager.py): block tables, reference counts, copy-on-write, prefix caching.

The producer plays the model runner: it keeps a fake cache (one token id per slot), writes every token the model would
compute into the slot its block table names, and performs the copies append_token asks for. Reading each live sequence
back through its table must then give exactly its tokens: a block shared without copy-on-write, or a wrong
prefix-cache hit, shows up as a wrong token. The grader also checks the bookkeeping after every operation (reference
counts equal the tables' use of each block, the free list holds exactly the unused blocks) and predicts the free
count, the copies and the errors with its own model of the cache.
"""

import random

import pytest

# -----------------------------------------------------------------------------
# Producers: run in the worker


def run_operations(operations: list, *, num_blocks: int, block_size: int, prefix_caching: bool = False) -> list:
    """Apply (op, *args) operations; after each, record the result and the manager's state."""
    from lab08_serving.block_manager import BlockManager, BlockManagerConfig

    manager = BlockManager(BlockManagerConfig(num_blocks=num_blocks, block_size=block_size,
                                              enable_prefix_caching=prefix_caching))
    cache = [[None] * block_size for _ in range(num_blocks)]  # what the model runner would have written
    log = []
    for op, *args in operations:
        try:
            if op == "allocate":
                seq, tokens = args
                result = manager.allocate(seq, tokens)
                for position in range(result, len(tokens)):  # only the uncached tokens are computed
                    block = manager.block_tables[seq][position // block_size]
                    cache[block][position % block_size] = tokens[position]
            elif op == "append":
                seq, token = args
                position = len(manager.token_ids[seq]) if seq in manager.token_ids else 0
                result = manager.append_token(seq, token)
                if result is not None:
                    src, dst = result
                    cache[dst] = list(cache[src])
                    result = [src, dst]
                block = manager.block_tables[seq][position // block_size]
                cache[block][position % block_size] = token
            elif op == "fork":
                result = manager.fork(*args)
            elif op == "free":
                result = manager.free(*args)
            else:
                raise AssertionError(f"unknown operation {op}")
        except NotImplementedError:
            raise  # a stub: the grader reports it as such, not as a wrong log
        except Exception as error:  # noqa: BLE001 - the grader decides whether this error was due
            result = {"error": type(error).__name__, "bases": [c.__name__ for c in type(error).__mro__],
                      "message": str(error)}
        views = {seq: [cache[table[p // block_size]][p % block_size] for p in range(len(manager.token_ids[seq]))]
                 for seq, table in manager.block_tables.items()}
        log.append({"result": result, "free": manager.num_free_blocks, "free_list": list(manager.free_blocks),
                    "ref_counts": list(manager.ref_counts),
                    "tables": {s: list(t) for s, t in manager.block_tables.items()},
                    "tokens": {s: list(t) for s, t in manager.token_ids.items()}, "views": views})
    return log


def error_of(operations: list, *, num_blocks: int, block_size: int) -> None:
    """Apply the operations; the last one is expected to raise (the error travels to the grader)."""
    from lab08_serving.block_manager import BlockManager, BlockManagerConfig

    manager = BlockManager(BlockManagerConfig(num_blocks=num_blocks, block_size=block_size))
    for op, *args in operations:
        {"allocate": manager.allocate, "append": manager.append_token, "fork": manager.fork,
         "free": manager.free}[op](*args)


# -----------------------------------------------------------------------------
# The grader's model of the cache: pages shared by sequences, no physical ids


class _Model:
    """Each sequence is a list of pages; a page is a list holding its users. Predicts free counts, copies, errors."""

    def __init__(self, num_blocks: int, block_size: int):
        self.capacity, self.size = num_blocks, block_size
        self.pages: dict[int, list[list]] = {}
        self.tokens: dict[int, list[int]] = {}

    def free_count(self) -> int:
        live = {id(page) for pages in self.pages.values() for page in pages}
        return self.capacity - len(live)

    def apply(self, op: str, *args):
        """The expected result: "full", "error", None, or for append whether a copy is due."""
        if op == "allocate":
            seq, tokens = args
            if seq in self.pages or not tokens:
                return "error"
            wanted = -(-len(tokens) // self.size)
            if wanted > self.free_count():
                return "full"
            self.pages[seq] = [[seq] for _ in range(wanted)]
            self.tokens[seq] = list(tokens)
            return 0
        if op == "append":
            seq, token = args
            if seq not in self.pages:
                return "error"
            pages, count = self.pages[seq], len(self.tokens[seq])
            shared_tail = count % self.size != 0 and len(pages[-1]) > 1
            if (count % self.size == 0 or shared_tail) and self.free_count() == 0:
                return "full"
            if count % self.size == 0:
                pages.append([seq])
            elif shared_tail:
                pages[-1].remove(seq)
                pages[-1] = [seq]
            self.tokens[seq].append(token)
            return "copy" if shared_tail else None
        if op == "fork":
            parent, child = args
            if parent not in self.pages or child in self.pages:
                return "error"
            for page in self.pages[parent]:
                page.append(child)
            self.pages[child] = list(self.pages[parent])
            self.tokens[child] = list(self.tokens[parent])
            return None
        seq = args[0]
        if seq not in self.pages:
            return "error"
        for page in self.pages.pop(seq):
            page.remove(seq)
        del self.tokens[seq]
        return None


def _check_bookkeeping(entry: dict, *, num_blocks: int, block_size: int, where: str) -> None:
    uses = [0] * num_blocks
    for table in entry["tables"].values():
        for block in table:
            uses[block] += 1
    assert entry["ref_counts"] == uses, f"{where}: ref_counts {entry['ref_counts']} but the tables use {uses}"
    unused = sorted(b for b in range(num_blocks) if uses[b] == 0)
    assert sorted(entry["free_list"]) == unused, f"{where}: free list {entry['free_list']}, unused blocks {unused}"
    assert entry["free"] == len(unused), f"{where}: num_free_blocks {entry['free']}, {len(unused)} blocks are unused"
    for seq, table in entry["tables"].items():
        count = len(entry["tokens"][seq])
        assert len(table) == -(-count // block_size), (
            f"{where}: sequence {seq} holds {count} tokens in {len(table)} blocks of {block_size}")
        assert entry["views"][seq] == entry["tokens"][seq], (
            f"{where}: reading sequence {seq} through its block table gives {entry['views'][seq]}, but it holds "
            f"{entry['tokens'][seq]} (a shared block written without copy-on-write, or a wrong cache hit?)")


def _random_operations(seed: int, count: int, *, vocab: int = 50, max_prompt: int = 11) -> list:
    rng = random.Random(seed)
    live, next_seq, operations = [], 0, []
    for _ in range(count):
        roll = rng.random()
        if not live or roll < 0.2:
            operations.append(["allocate", next_seq, [rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))]])
            live.append(next_seq)
            next_seq += 1
        elif roll < 0.35:
            operations.append(["fork", rng.choice(live), next_seq])
            live.append(next_seq)
            next_seq += 1
        elif roll < 0.47:
            operations.append(["free", live.pop(rng.randrange(len(live)))])
        else:
            operations.append(["append", rng.choice(live), rng.randrange(vocab)])
    return operations


def _check_against_model(operations: list, log: list, *, num_blocks: int, block_size: int) -> None:
    model = _Model(num_blocks, block_size)
    for step, (operation, entry) in enumerate(zip(operations, log)):
        where = f"after operation {step} {operation[:2]}"
        expected = model.apply(*operation)
        result = entry["result"]
        if expected == "full":
            assert isinstance(result, dict) and "CacheFullError" in result["bases"], (
                f"{where}: the cache is full, expected CacheFullError, got {result}")
        elif expected == "error":
            assert isinstance(result, dict) and "ValueError" in result["bases"], f"{where}: expected ValueError"
        else:
            assert not isinstance(result, dict), f"{where}: unexpected {result}"
            if operation[0] == "append":
                assert (result is not None) == (expected == "copy"), (
                    f"{where}: append_token returned {result}; a copy is due exactly when the last block is partly "
                    f"filled and shared ({'it is' if expected == 'copy' else 'it is not'})")
        assert entry["free"] == model.free_count(), (
            f"{where}: {entry['free']} free blocks, expected {model.free_count()}")
        _check_bookkeeping(entry, num_blocks=num_blocks, block_size=block_size, where=where)
        assert set(entry["tables"]) == set(model.tokens), (
            f"{where}: sequences holding blocks {sorted(entry['tables'])}, expected {sorted(model.tokens)}")


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(3)
def test_allocate_append_free(student):
    """Blocks per prompt, a new block exactly when the last one is full, and freeing returns every block."""
    ops = [["allocate", 0, [1, 2, 3, 4, 5]], ["append", 0, 6], ["append", 0, 7], ["append", 0, 8], ["append", 0, 9],
           ["allocate", 1, [10, 11, 12, 13, 14, 15, 16, 17]], ["append", 1, 18], ["free", 0], ["free", 1]]
    log = student.run(run_operations, ops, num_blocks=6, block_size=4)
    assert [e["free"] for e in log] == [4, 4, 4, 4, 3, 1, 0, 3, 6], (
        f"free blocks after each of {ops}: {[e['free'] for e in log]}, expected [4, 4, 4, 4, 3, 1, 0, 3, 6]")
    assert log[0]["result"] == 0, f"allocate without prefix caching must return 0 cached tokens, got {log[0]['result']}"
    assert all(e["result"] is None for e in log[1:5]), "append_token on an unshared sequence must never copy"
    _check_against_model(ops, log, num_blocks=6, block_size=4)


@pytest.mark.points(3)
def test_fork_shares_blocks_and_copies_on_write(student):
    """After a fork both sequences hold the same blocks (counts 2); the first append into the shared, partly filled
    last block copies it, the second (now unshared) does not; a shared full block is never copied."""
    ops = [["allocate", 0, [5, 6, 7, 8, 9, 10]], ["fork", 0, 1], ["append", 1, 11], ["append", 0, 12],
           ["append", 0, 13], ["append", 1, 14], ["fork", 0, 2], ["append", 2, 15], ["free", 0], ["free", 2],
           ["free", 1]]
    log = student.run(run_operations, ops, num_blocks=7, block_size=4)
    tables = log[1]["tables"]
    assert tables[0] == tables[1], f"fork: the child's table {tables[1]} must equal the parent's {tables[0]}"
    assert all(log[1]["ref_counts"][b] == 2 for b in tables[0]), "fork: every shared block's count must be 2"
    copy = log[2]["result"]
    assert copy is not None and copy[0] == tables[0][1] and copy[1] not in tables[0], (
        f"append into the shared, partly filled block {tables[0][1]} must copy it into a free block, got {copy}")
    assert log[2]["tables"][1][1] == copy[1] and log[2]["tables"][0] == tables[0], (
        "copy-on-write: the appending sequence moves to the copy, the other keeps the original")
    assert log[3]["result"] is None, "the original is no longer shared: no second copy"
    assert log[7]["result"] is None, "the forked sequence's last block is full: a new block, not a copy"
    _check_against_model(ops, log, num_blocks=7, block_size=4)


@pytest.mark.points(2)
def test_exhaustion_raises_and_changes_nothing(student):
    """An allocation, an append or a copy-on-write that needs a block when none is free raises CacheFullError (a
    RuntimeError) and leaves the state as it was (the scheduler preempts and asks again)."""
    ops = [["allocate", 0, [1, 2, 3, 4, 5, 6]], ["allocate", 1, [7, 8, 9]], ["allocate", 2, [1, 2]],
           ["append", 1, 4], ["fork", 1, 3], ["append", 3, 6], ["free", 1], ["free", 3], ["append", 0, 7],
           ["append", 0, 8], ["allocate", 2, [3]], ["append", 0, 9], ["append", 0, 10]]
    log = student.run(run_operations, ops, num_blocks=3, block_size=3)
    assert "CacheFullError" in log[2]["result"]["bases"], f"allocate with no free block: {log[2]['result']}"
    assert "RuntimeError" in log[2]["result"]["bases"], "CacheFullError must be a RuntimeError"
    assert log[2]["tables"] == log[1]["tables"] and log[2]["free_list"] == log[1]["free_list"], (
        "a failed allocate must leave the tables and the free list unchanged")
    _check_against_model(ops, log, num_blocks=3, block_size=3)
    ops = [["allocate", 0, [1, 2]], ["fork", 0, 1], ["allocate", 2, [5]], ["append", 1, 3], ["free", 2],
           ["append", 1, 3]]
    log = student.run(run_operations, ops, num_blocks=2, block_size=3)
    assert "CacheFullError" in log[3]["result"]["bases"], f"a copy-on-write with no free block: {log[3]['result']}"
    assert log[3]["tables"] == log[2]["tables"] and log[3]["ref_counts"] == log[2]["ref_counts"], (
        "a failed copy-on-write must leave the tables and the counts unchanged")
    _check_against_model(ops, log, num_blocks=2, block_size=3)


@pytest.mark.points(2)
@pytest.mark.parametrize("ops, match", [
    ([["allocate", 0, [1, 2]], ["free", 0], ["free", 0]], "freed twice"),
    ([["allocate", 0, [1]], ["free", 3]], "3"),
    ([["allocate", 0, [1]], ["allocate", 0, [2]]], "0"),
    ([["allocate", 0, [1]], ["allocate", 1, []]], "empty"),
    ([["allocate", 0, [1]], ["append", 5, 1]], "5"),
    ([["allocate", 0, [1]], ["fork", 1, 2]], "1"),
    ([["allocate", 0, [1]], ["allocate", 1, [2]], ["fork", 0, 1]], "1"),
])
def test_misuse_raises_value_error(student, ops, match):
    """Double free, freeing or appending to an unknown sequence, allocating twice or nothing, bad forks: ValueError
    naming the sequence (or saying it was freed twice)."""
    with pytest.raises(ValueError, match=match):
        student.run(error_of, ops, num_blocks=4, block_size=2)


@pytest.mark.points(4)
@pytest.mark.parametrize("seed, num_blocks, block_size", [(0, 12, 4), (1, 9, 3), (2, 20, 5), (3, 7, 1)])
def test_random_operations_keep_every_invariant(student, seed, num_blocks, block_size):
    """200 random allocations, forks, appends and frees on a small cache (exhaustion included): after every one, the
    counts equal the tables' use, the free list holds exactly the unused blocks, copies happen exactly when due, and
    every sequence reads back its own tokens."""
    ops = _random_operations(seed, 200)
    log = student.run(run_operations, ops, num_blocks=num_blocks, block_size=block_size)
    _check_against_model(ops, log, num_blocks=num_blocks, block_size=block_size)


# ---- prefix caching (the graded extension)

PREFIX = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32]


@pytest.mark.points(2)
def test_prefix_caching_shares_full_blocks_of_a_common_prefix(student):
    """A prompt sharing two full blocks with a live one reuses them (8 cached tokens, counts 2); a prompt that is
    exactly two cached blocks reuses only the first (its last token must be recomputed); partial blocks never hit."""
    ops = [["allocate", 0, PREFIX], ["allocate", 1, PREFIX[:8] + [40, 41]], ["allocate", 2, PREFIX[:8]],
           ["allocate", 3, PREFIX[:3]], ["allocate", 4, [99] + PREFIX[1:9]]]
    log = student.run(run_operations, ops, num_blocks=12, block_size=4, prefix_caching=True)
    assert [e["result"] for e in log] == [0, 8, 4, 0, 0], (
        f"cached tokens per allocation: {[e['result'] for e in log]}, expected [0, 8, 4, 0, 0]")
    tables = log[-1]["tables"]
    assert tables[1][:2] == tables[0][:2] and tables[2][0] == tables[0][0], "cache hits must share the blocks"
    assert tables[2][1] != tables[0][1], "the block holding the last prompt token is never taken from the cache"
    frees = [e["free"] for e in log]
    assert frees == [9, 8, 7, 6, 3], f"free blocks after each allocation: {frees}, expected [9, 8, 7, 6, 3]"
    _check_bookkeeping(log[-1], num_blocks=12, block_size=4, where="after the allocations")


@pytest.mark.points(2)
def test_prefix_cache_survives_free_until_evicted(student):
    """Freed blocks keep their names in the free list: a later prompt revives them. Blocks are reused least recently
    freed first, and a sequence frees its tail first, so a prefix is evicted from its end: after the second block of
    the prefix is handed out for other tokens, only the first still hits."""
    ops = [["allocate", 0, PREFIX], ["free", 0], ["allocate", 1, PREFIX[:9]], ["free", 1],
           ["allocate", 2, [1, 2, 3, 4, 5]], ["allocate", 3, PREFIX[:9]], ["free", 3],
           ["allocate", 4, list(range(40, 52))], ["free", 2], ["allocate", 5, PREFIX[:9]]]
    log = student.run(run_operations, ops, num_blocks=6, block_size=4, prefix_caching=True)
    assert [log[i]["result"] for i in (2, 5, 9)] == [8, 8, 4], (
        f"cached tokens: {[log[i]['result'] for i in (2, 5, 9)]}, expected [8, 8, 4]: revived after a free, still "
        "cached after 2 other blocks were handed out, half evicted after 3 more")
    for step, entry in enumerate(log):
        _check_bookkeeping(entry, num_blocks=6, block_size=4, where=f"after operation {step} {ops[step][:2]}")


@pytest.mark.points(2)
def test_blocks_filled_by_decoding_are_cached(student):
    """A block that appends fill is named too: a prompt equal to a sequence's prompt and output reuses it."""
    ops = [["allocate", 0, [3, 1, 4]], ["append", 0, 1], ["append", 0, 5], ["append", 0, 9], ["append", 0, 2],
           ["append", 0, 6], ["allocate", 1, [3, 1, 4, 1, 5, 9, 2, 6, 5]], ["allocate", 2, [3, 1, 4, 1, 5, 9, 2]]]
    log = student.run(run_operations, ops, num_blocks=8, block_size=4, prefix_caching=True)
    assert log[6]["result"] == 8 and log[7]["result"] == 4, (
        f"cached tokens {log[6]['result']} and {log[7]['result']}, expected 8 and 4")
    _check_bookkeeping(log[-1], num_blocks=8, block_size=4, where="at the end")


@pytest.mark.points(2)
@pytest.mark.parametrize("seed", [6, 10])
def test_random_operations_with_prefix_caching(student, seed):
    """Random operations over prompts drawn from a few shared prefixes, with prefix caching on: the bookkeeping holds
    after every operation, every sequence reads back its own tokens, and prompts hit the cache."""
    rng = random.Random(seed)
    stems = [[rng.randrange(30) for _ in range(9)] for _ in range(3)]
    ops = _random_operations(seed, 150, vocab=30)
    for op in ops:
        if op[0] == "allocate" and rng.random() < 0.7:
            op[2] = rng.choice(stems)[:rng.randint(4, 9)] + op[2][:rng.randint(0, 3)]
    log = student.run(run_operations, ops, num_blocks=32, block_size=2, prefix_caching=True)
    for step, entry in enumerate(log):
        result = entry["result"]
        if ops[step][0] == "allocate" and not isinstance(result, dict):
            assert result % 2 == 0 and result < len(ops[step][2]), f"operation {step}: cached {result} tokens"
        _check_bookkeeping(entry, num_blocks=32, block_size=2, where=f"after operation {step} {ops[step][:2]}")
    hits = sum(e["result"] for op, e in zip(ops, log) if op[0] == "allocate" and isinstance(e["result"], int))
    assert hits > 0, "no prompt hit the cache, though many share prefixes"
