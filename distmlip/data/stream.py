"""Rank-partitioned streaming of a data set.

``partition_by_atoms`` cuts the (sorted) structure indices into ``world_size`` contiguous
pieces at the prefix-sum positions of the atom counts closest to k * total / world_size: the
pieces are disjoint, cover every index, are balanced by atoms (imbalance at most about one
structure) and keep file order, so each rank reads long contiguous slabs.

``PartitionedStream`` gives one rank its batches: every epoch the rank's partition is
shuffled with numpy ``Generator(PCG64)`` seeded by (seed, epoch, rank) -- identical on every
machine -- and cut into the fewest batches bounded by ``batch_atoms`` and ``batch_structures``,
of near-equal size (no small remainder batch: ranks step in lockstep).
The shuffle permutes blocks of ``shuffle_block`` consecutive structures and then the
structures inside windows of ``shuffle_window`` blocks: a batch then touches few file regions
(fast reads), while every structure can still meet any other across epochs.  ``shuffle_block
=1`` is a full permutation.  ``steps(epoch)`` is computed from all partitions (no
communication) and is the same on every rank; ranks with fewer batches yield empty lists at the
end.  A background thread reads the next batch while the current one is used.

With ``groups`` (a group key per data-set structure), structures of one group are never
separated: the partition, the shuffle and the batch cuts work on whole groups (a GPR-augmented
copy travels with its parent, so the training loss can compare their energies; a group larger
than ``batch_atoms`` is a batch alone)."""
from __future__ import annotations

import queue
import threading

import numpy as np

from .structure import Structure


def partition_by_atoms(natoms, indices, world_size: int) -> list[np.ndarray]:
    """Split ``indices`` (structure indices into ``natoms``) into ``world_size`` disjoint,
    covering, atom-balanced, contiguous (in sorted order) index arrays.  Deterministic."""
    natoms = np.asarray(natoms, dtype=np.int64)
    idx = np.sort(np.unique(np.asarray(indices, dtype=np.int64))) if indices is not None \
        else np.arange(len(natoms), dtype=np.int64)
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    cuts = [0]
    for pos in _nearest_prefix_cuts(natoms[idx], world_size):
        cuts.append(min(max(int(pos), cuts[-1]), len(idx)))
    cuts.append(len(idx))
    return [idx[cuts[k]:cuts[k + 1]] for k in range(world_size)]


def _nearest_prefix_cuts(weights, parts: int) -> np.ndarray:
    """[parts - 1] cut positions into items in order (weights[k] each): for k = 1 .. parts-1 the
    prefix length whose weight sum is closest to k * total / parts (a tie takes the shorter
    prefix).  Not clamped: equal or out-of-order positions are the caller's to handle."""
    csum = np.cumsum(np.asarray(weights, dtype=np.int64))
    if len(csum) == 0:
        return np.zeros(max(parts - 1, 0), dtype=np.int64)
    total = int(csum[-1])
    target = total * np.arange(1, parts) / parts
    c = np.searchsorted(csum, target)                       # first prefix with csum >= target
    lo = np.where(c >= 1, csum[np.maximum(c - 1, 0)], 0)
    hi = np.where(c < len(csum), csum[np.minimum(c, len(csum) - 1)], total)
    return np.where(np.abs(lo - target) <= np.abs(hi - target), c, c + 1)


def _unit_layout(idx, natoms, groups):
    """Structures ``idx`` grouped by ``groups[idx]``: (indices ordered by (group, index), start
    of each group in that order, atoms per group).  Groups are ordered by their smallest index,
    so the units keep file order as far as the groups allow."""
    key = np.asarray(groups, dtype=np.int64)[idx]
    _, inv = np.unique(key, return_inverse=True)
    first = np.full(int(inv.max()) + 1 if len(inv) else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inv, idx)
    rank_of = first[inv]
    o = np.lexsort((idx, rank_of))
    idx2 = idx[o]
    r2 = rank_of[o]
    starts = np.flatnonzero(np.r_[True, r2[1:] != r2[:-1]]) if len(idx2) else np.zeros(0, np.int64)
    atoms = np.add.reduceat(np.asarray(natoms, dtype=np.int64)[idx2], starts) if len(idx2) else np.zeros(0, np.int64)
    return idx2, starts, atoms


def _greedy_bounds(atoms, counts, cap_atoms: int, cap_structures: int) -> list[int]:
    """Greedy cut of items (``atoms[k]`` atoms and ``counts[k]`` structures each, in order) under
    both caps: the fewest contiguous batches (an item over a cap is a batch alone)."""
    bounds, cur_a, cur_s = [0], 0, 0
    for k in range(len(atoms)):
        a, m = int(atoms[k]), int(counts[k])
        if cur_s and (cur_a + a > cap_atoms or cur_s + m > cap_structures):
            bounds.append(k)
            cur_a, cur_s = 0, 0
        cur_a += a
        cur_s += m
    if len(atoms):
        bounds.append(len(atoms))
    return bounds


def _fits(bounds, atoms, counts, batch_atoms: int, batch_structures: int) -> bool:
    b = np.asarray(bounds, dtype=np.int64)
    if np.any(np.diff(b) <= 0):
        return False
    ca = np.r_[0, np.cumsum(atoms)]
    cs = np.r_[0, np.cumsum(counts)]
    single = np.diff(b) == 1
    return bool(np.all(single | ((ca[b[1:]] - ca[b[:-1]] <= batch_atoms) & (cs[b[1:]] - cs[b[:-1]] <= batch_structures))))


def _balanced_bounds(atoms, counts, batch_atoms: int, batch_structures: int) -> list[int]:
    """Bounds that cut the items in order into as few batches as the greedy cut, within both
    budgets, but of near-equal atoms: the greedy cut leaves a small remainder batch at the end of
    every partition, and since each rank visits its batches in its own order, one rank's full
    batch then meets another's remainder at the same step and the synchronous step waits for the
    larger (docs/results.md, "Ranks"); a remainder batch also takes a full learning-rate step on
    a noisy gradient.  First the cut at the prefix sums
    nearest k * total / n (vectorised); where item sizes keep that from fitting, the greedy cut
    under the smallest atom cap that still needs no more batches (bisection)."""
    atoms = np.asarray(atoms, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    greedy = _greedy_bounds(atoms, counts, batch_atoms, batch_structures)
    nb = len(greedy) - 1
    if nb <= 1:
        return greedy
    bounds = [0] + _nearest_prefix_cuts(atoms, nb).tolist() + [len(atoms)]
    if _fits(bounds, atoms, counts, batch_atoms, batch_structures):
        return bounds
    lo_cap, hi_cap = max(1, int(-(-int(atoms.sum()) // nb))), int(batch_atoms)
    while lo_cap < hi_cap:
        mid = (lo_cap + hi_cap) // 2
        if len(_greedy_bounds(atoms, counts, mid, batch_structures)) - 1 <= nb:
            hi_cap = mid
        else:
            lo_cap = mid + 1
    return _greedy_bounds(atoms, counts, hi_cap, batch_structures)


def make_unit_batches(units: list[np.ndarray], natoms, batch_atoms: int, batch_structures: int) -> list[np.ndarray]:
    """:func:`make_batches` over whole units (index arrays): a batch is cut only between units."""
    if not units:
        return []
    n = np.asarray(natoms, dtype=np.int64)
    b = _balanced_bounds([int(n[u].sum()) for u in units], [len(u) for u in units], batch_atoms, batch_structures)
    return [np.concatenate(units[b[i]:b[i + 1]]) for i in range(len(b) - 1)]


def make_batches(order, natoms, batch_atoms: int, batch_structures: int) -> list[np.ndarray]:
    """Cut ``order`` into the fewest batches of at most ``batch_atoms`` atoms and
    ``batch_structures`` structures (a structure larger than ``batch_atoms`` is a batch alone),
    of near-equal atom counts (:func:`_balanced_bounds`)."""
    order = np.asarray(order, dtype=np.int64)
    n = np.asarray(natoms, dtype=np.int64)[order]
    b = _balanced_bounds(n, np.ones(len(order), dtype=np.int64), batch_atoms, batch_structures)
    return [order[b[i]:b[i + 1]] for i in range(len(b) - 1)]


_END = object()


class PartitionedStream:
    def __init__(self, ds, indices=None, rank: int = 0, world_size: int = 1, batch_atoms: int = 4096,
                 batch_structures: int = 64, seed: int = 0, shuffle: bool = True, prefetch: bool = True,
                 shuffle_block: int = 64, shuffle_window: int = 16, loader=None, fixed_batches: bool = False,
                 groups=None, sample_mask=None, sample_k: int = 0, sample_fixed: bool = False):
        """``loader(indices) -> item``: what a batch of data-set indices becomes, computed in the
        prefetch thread (e.g. the trainer's prepared structures); default: the Structures read
        from the data set.  ``fixed_batches`` (with ``shuffle``): the batches are formed once,
        from the shuffled order of epoch 0, and every epoch visits them in its own random order
        (so an assembled batch can be kept and reused); otherwise each epoch forms new batches.
        ``groups``: a group key per data-set structure; the structures of a group stay together
        (module docstring).  ``sample_mask`` (bool per data-set structure) with ``sample_k`` > 0
        and ``groups``: each epoch a group keeps its unmasked members and ``sample_k`` of its
        masked ones (GPR copies of one parent), drawn without replacement from (seed, epoch, rank),
        so that each epoch sees other copies (batches are then formed anew every epoch);
        ``sample_k`` may also be an array, one number per data-set structure (a group draws its
        first member's number; 0: all its copies); ``sample_fixed``: the same draw (epoch 0's) every epoch (a validation set that stays
        comparable across epochs)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        if batch_atoms < 1 or batch_structures < 1:
            raise ValueError("batch_atoms and batch_structures must be >= 1")
        self.ds = ds
        self.rank = rank
        self.world_size = world_size
        self.batch_atoms = int(batch_atoms)
        self.batch_structures = int(batch_structures)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.fixed_batches = bool(fixed_batches)
        self.prefetch = prefetch
        self.shuffle_block = max(1, int(shuffle_block))
        self.shuffle_window = max(1, int(shuffle_window))
        self.natoms = np.asarray(ds.natoms, dtype=np.int64)
        self.units = None       # per rank: list of index arrays (groups), when ``groups`` is given
        if groups is None:
            self.parts = partition_by_atoms(self.natoms, indices, world_size)
        else:
            idx = np.sort(np.unique(np.asarray(indices, dtype=np.int64))) if indices is not None \
                else np.arange(len(self.natoms), dtype=np.int64)
            idx2, starts, atoms = _unit_layout(idx, self.natoms, groups)
            bounds = np.r_[starts, len(idx2)]
            unit_parts = partition_by_atoms(atoms, None, world_size)
            self.units = [[idx2[bounds[u]:bounds[u + 1]] for u in p] for p in unit_parts]
            self.parts = [np.sort(np.concatenate(us)) if us else np.zeros(0, np.int64) for us in self.units]
        # sample_k: one number for every group, or one per data-set structure (a group takes its
        # first member's; 0 there: all its copies), e.g. per subset from the data set
        k = sample_k if (groups is not None and sample_mask is not None) else 0
        if np.ndim(k):
            k = np.asarray(k, dtype=np.int64)
            self._k_of = np.where(k > 0, k, np.iinfo(np.int64).max)
            k = int(k.max()) if k.size else 0
        else:
            self._k_of = None
        self.sample_k = int(k)
        self.sample_mask = None if self.sample_k <= 0 else np.asarray(sample_mask, dtype=bool)
        self.sample_fixed = bool(sample_fixed)
        if self.sample_k > 0 and not self.sample_fixed:
            self.fixed_batches = False
        self._current_epoch = 0
        self._cache: dict = {}
        self.loader = loader

    # -- deterministic plan -------------------------------------------------------------------
    def partition(self, rank: int | None = None) -> np.ndarray:
        return self.parts[self.rank if rank is None else rank]

    def order(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """Structure order of ``rank`` (default: own) in ``epoch``."""
        r = self.rank if rank is None else rank
        if self.units is not None:
            us = self.units[r]
            return np.concatenate([us[k] for k in self._positions(len(us), epoch, r)]) if us \
                else np.zeros(0, np.int64)
        part = self.parts[r]
        return part[self._positions(len(part), epoch, r)]

    def _units_in_order(self, epoch: int, r: int) -> list[np.ndarray]:
        us = self.units[r]
        return [us[k] for k in self._positions(len(us), epoch, r)]

    def _positions(self, n: int, epoch: int, r: int) -> np.ndarray:
        """The shuffled order of ``n`` items (structures, or groups) of rank ``r`` in ``epoch``."""
        if not self.shuffle or n == 0:
            return np.arange(n, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch), r])))
        B = self.shuffle_block
        if B == 1:
            return rng.permutation(n)
        nblk = (n + B - 1) // B
        blocks = rng.permutation(nblk)
        pos = (blocks[:, None] * B + np.arange(B)[None, :]).reshape(-1)
        pos = pos[pos < n]
        W = B * self.shuffle_window
        for a in range(0, len(pos), W):
            seg = pos[a:a + W]
            pos[a:a + W] = seg[rng.permutation(len(seg))]
        return pos

    def _sampled(self, units: list[np.ndarray], epoch: int, r: int) -> list[np.ndarray]:
        """``units`` with each one's masked members cut to ``sample_k``: the ``sample_k`` with the
        smallest hash of (seed, epoch, data-set index).  A function of the structure alone, not
        of the rank that holds it or its place in the rank's order (sweep 10: a per-rank random
        stream gave another fixed validation draw on 3 ranks than on 1)."""
        if not units:
            return []
        k = self.sample_k
        # all units at once (a loop over a rank's parents cost 5 % of a pool epoch): rank each
        # masked member among its unit's masked members by key, keep the k lowest
        sizes = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
        flat = np.concatenate(units)
        unit = np.repeat(np.arange(len(units)), sizes)
        m = self.sample_mask[flat]
        keys = np.zeros(len(flat), dtype=np.uint64)
        keys[m] = _draw_keys(self.seed, epoch, flat[m])
        order = np.lexsort((keys, ~m, unit))          # by unit, masked members first, by key
        first = np.r_[0, np.cumsum(sizes)[:-1]]
        rank_in_unit = np.empty(len(flat), dtype=np.int64)
        rank_in_unit[order] = np.arange(len(flat)) - np.repeat(first, sizes)
        if self._k_of is not None:         # per group: its first member's (the parent's) number
            k = self._k_of[flat[first]][unit]
        keep = ~m | (rank_in_unit < k)
        cut = np.cumsum(np.bincount(unit[keep], minlength=len(units)))[:-1]
        return np.split(flat[keep], cut)

    def _cut(self, epoch: int, r: int) -> list[np.ndarray]:
        if self.units is not None:
            units = self._units_in_order(epoch, r)
            if self.sample_k > 0:
                units = self._sampled(units, 0 if self.sample_fixed else epoch, r)
            return make_unit_batches(units, self.natoms, self.batch_atoms, self.batch_structures)
        return make_batches(self.order(epoch, r), self.natoms, self.batch_atoms, self.batch_structures)

    def batches(self, epoch: int, rank: int | None = None) -> list[np.ndarray]:
        r = self.rank if rank is None else rank
        key = (int(epoch), r)
        if key not in self._cache:
            if len(self._cache) > 4 * self.world_size + 8:
                self._cache = {k: v for k, v in self._cache.items() if k[0] == "fixed"}
            if self.fixed_batches and self.shuffle:
                if ("fixed", r) not in self._cache:
                    self._cache[("fixed", r)] = self._cut(0, r)
                base = self._cache[("fixed", r)]
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch), r, 1])))
                self._cache[key] = [base[k] for k in rng.permutation(len(base))] if int(epoch) > 0 else list(base)
            else:
                self._cache[key] = self._cut(epoch, r)
        return self._cache[key]

    def steps(self, epoch: int) -> int:
        """Steps of ``epoch``: the largest batch count over all ranks (same on every rank)."""
        return max(len(self.batches(epoch, r)) for r in range(self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the current epoch (the last one started with ``epoch()``, initially 0)."""
        return self.steps(self._current_epoch)

    # -- iteration -----------------------------------------------------------------------------
    def epoch(self, epoch: int, start_step: int = 0):
        """Yield ``steps(epoch) - start_step`` lists of Structure (empty lists pad short ranks).
        ``start_step`` resumes an interrupted epoch at that step."""
        self._current_epoch = int(epoch)
        mine = self.batches(epoch)
        n = self.steps(epoch)
        plan = [mine[s] if s < len(mine) else np.zeros(0, np.int64) for s in range(int(start_step), n)]
        gen = self._produce(plan)
        # a background thread pays off while batches must be read or prepared; once a loader has
        # everything of the epoch at hand it would only add thread switches to every step
        cheap = getattr(self.loader, "cheap", None)
        if not self.prefetch or (cheap is not None and all(cheap(p) for p in plan if len(p))):
            yield from gen
            return
        yield from self._prefetched(gen)

    def __iter__(self):
        return self.epoch(self._current_epoch)

    def _produce(self, plan):
        """Read the planned batches window by window: the structures of one shuffle window
        (``shuffle_block * shuffle_window`` consecutive entries of the epoch order) are read
        together, so a window costs at most ``shuffle_window`` contiguous slab reads."""
        if not plan:
            return
        if self.loader is not None:
            for idx in plan:
                yield self.loader(idx) if len(idx) else []
            return
        W = self.shuffle_block * self.shuffle_window
        flat = np.concatenate([p for p in plan if len(p)]) if any(len(p) for p in plan) else np.zeros(0, np.int64)
        cache: dict[int, Structure] = {}
        pos = 0
        for idx in plan:
            if len(idx) == 0:
                yield []
                continue
            missing = [int(i) for i in idx if int(i) not in cache]
            if missing:
                # read the rest of the current window (from this batch on) in one go
                end = min(len(flat), (pos // W + 1) * W)
                end = max(end, pos + len(idx))
                want = flat[pos:end]
                cache = {i: cache[i] for i in idx if int(i) in cache}
                for st in self.ds.read(want):
                    cache[st.index] = st
            yield [cache.pop(int(i)) for i in idx]
            pos += len(idx)

    def _prefetched(self, gen):
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker():
            try:
                for batch in gen:
                    if stop.is_set() or not put(("ok", batch)):
                        return
                put(("end", None))
            except BaseException as exc:  # propagate to the consumer
                put(("error", exc))

        t = threading.Thread(target=worker, name=f"distmlip-prefetch-r{self.rank}", daemon=True)
        t.start()
        try:
            while True:
                kind, val = q.get()
                if kind == "ok":
                    yield val
                elif kind == "end":
                    return
                else:
                    raise val
        finally:
            stop.set()
            t.join(timeout=10)


def _draw_keys(seed: int, epoch: int, idx: np.ndarray) -> np.ndarray:
    """A uniform 64-bit key per data-set index for (seed, epoch): splitmix64 of the three."""
    with np.errstate(over="ignore"):
        x = (np.asarray(idx, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64((int(seed) * 0x632BE59BD9B4E019 + int(epoch) * 0x85157AF5 + 0x2545F491) % (1 << 64)))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def partition_atoms(parts, natoms) -> list[int]:
    natoms = np.asarray(natoms)
    return [int(natoms[p].sum()) for p in parts]


__all__ = ["partition_by_atoms", "make_batches", "make_unit_batches", "PartitionedStream", "partition_atoms",
           "Structure"]
