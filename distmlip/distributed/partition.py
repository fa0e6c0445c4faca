"""Deterministic splits of work over ranks.

Why a module of its own: these are pure functions of (sizes, rank, world size), with no
communication, so that every rank computes the same answer on its own and a test can check them
without a job.
"""
from __future__ import annotations

import heapq


def split_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of ``range(n)`` for ``rank``: sizes differ by at most 1."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def balanced_partition(costs, world_size: int) -> list[list[int]]:
    """Split item indices into ``world_size`` lists with nearly equal summed cost (e.g. atoms).

    Deterministic greedy (largest first to the least loaded, ties by rank); each list is sorted.
    Every rank computing it from the same ``costs`` gets the same answer.
    """
    costs = [float(c) for c in costs]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world_size)]
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(p) for p in parts]


def lend_plan(hosts, busy) -> dict[int, list[int]]:
    """Which idle ranks lend their cores to which busy rank: {busy rank: [idle ranks]}.

    ``hosts[r]`` is rank r's node, ``busy[r]`` whether it has work.  Only ranks of one node can
    lend to each other (a thread cannot run on another node's core).  Each idle rank, in rank
    order, goes to the busy rank of its node that has the fewest lenders so far (ties: lowest
    rank), so that the idle cores of a node are spread evenly over its working ranks.  Idle ranks
    on a node without a busy rank lend to nobody.
    """
    # fewest lenders first, ties to the lowest rank, is a round robin over the node's busy ranks;
    # grouped by node so that a job of thousands of ranks does not compare every pair
    takers: dict = {}
    for r, b in enumerate(busy):
        if b:
            takers.setdefault(hosts[r], []).append(r)
    out: dict[int, list[int]] = {}
    given: dict = {}
    for r, b in enumerate(busy):
        if b or hosts[r] not in takers:
            continue
        ks = takers[hosts[r]]
        k = ks[given.get(hosts[r], 0) % len(ks)]
        given[hosts[r]] = given.get(hosts[r], 0) + 1
        out.setdefault(k, []).append(r)
    return out
