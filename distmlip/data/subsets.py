"""Grouping of structures into homogeneous subsets.

``auto`` (default): one subset per exact sequence of atomic numbers (hence per composition,
atom count and atom order); names are the Hill formula plus an index among the subsets of that
composition, e.g. ``C6H8O6_0``, numbered in order of first appearance in the input.
``directory``: one subset per parent directory of the source file.
``pattern``: one subset per value of a regular expression on the source path (first group if
the regex has groups, else the whole match)."""
from __future__ import annotations

import os
import re

import numpy as np

from ..errors import ConfigError, InputError
from .structure import Structure

SUBSET_MODES = ("auto", "directory", "pattern")


def composition_of(numbers) -> str:
    from ase.formula import Formula
    from ase.data import chemical_symbols

    return Formula.from_list([chemical_symbols[int(z)] for z in numbers]).format("hill")


class SubsetBuilder:
    """Collects subset keys in order of first appearance; mergeable across MPI ranks."""

    def __init__(self, by: str = "auto", pattern: str | None = None):
        if by not in SUBSET_MODES:
            raise ConfigError(f"subset_by must be one of {', '.join(SUBSET_MODES)}, got {by!r}")
        if by == "pattern":
            if not pattern:
                raise ConfigError("subset_by 'pattern' needs subset_pattern (a regular expression)")
            try:
                self._rx = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"subset_pattern {pattern!r} is not a valid regular expression: {exc}") from None
        self.by = by
        self.pattern = pattern
        # key -> [composition or None (mixed), natoms or -1 (mixed), order bytes or None (mixed)]
        self.info: dict = {}
        self.ids: dict = {}      # key -> local id (order of first appearance)
        self._comp: dict = {}    # atom order -> Hill formula

    def key(self, s: Structure):
        if self.by == "auto":
            return np.asarray(s.numbers, dtype=np.uint8).tobytes()
        if self.by == "directory":
            return os.path.dirname(os.path.abspath(s.source)) or "."
        m = self._rx.search(s.source)
        if m is None:
            raise InputError(f"{s.source}: structure {s.source_index}: field 'subset': source path does "
                             f"not match subset_pattern {self.pattern!r}")
        return m.group(1) if m.groups() else m.group(0)

    def add(self, s: Structure):
        k = self.key(s)
        order = np.asarray(s.numbers, dtype=np.uint8).tobytes()
        if self.by == "auto" and k in self.info:
            return k        # the key is the atom order: composition and count are the same
        comp = self._comp.get(order)
        if comp is None:
            # the Hill formula costs more than reading the structure; data sets repeat a few
            # atom orders, so a small cache (cleared when full: bounded memory) saves most of it
            if len(self._comp) >= 4096:
                self._comp.clear()
            comp = self._comp[order] = composition_of(s.numbers)
        if k not in self.info:
            self.info[k] = [comp, int(len(s.numbers)), order]
            self.ids[k] = len(self.ids)
        else:
            rec = self.info[k]
            if rec[0] != comp:
                rec[0] = None
            if rec[1] != len(s.numbers):
                rec[1] = -1
            if rec[2] != order:
                rec[2] = None
        return k

    def state(self):
        return self.info

    def merge(self, info: dict) -> None:
        for k, (comp, nat, order) in info.items():
            if k not in self.info:
                self.info[k] = [comp, nat, order]
                self.ids[k] = len(self.ids)
            else:
                rec = self.info[k]
                rec[0] = rec[0] if rec[0] == comp else None
                rec[1] = rec[1] if rec[1] == nat else -1
                rec[2] = rec[2] if rec[2] == order else None

    def finalize(self) -> tuple[list[dict], dict]:
        """-> (subset table, key -> subset id).  Table entries: name, composition, natoms,
        order (np.ndarray of atomic numbers, or None when the subset is not homogeneous)."""
        table = []
        ids = {}
        per_comp: dict[str, int] = {}
        for k, (comp, nat, order) in self.info.items():
            if self.by == "auto":
                n = per_comp.get(comp, 0)
                per_comp[comp] = n + 1
                name = f"{comp}_{n}"
            elif self.by == "directory":
                name = os.path.basename(k) or k
                # disambiguate equal basenames from different parents
                base, j = name, 1
                while any(t["name"] == name for t in table):
                    name = f"{base}_{j}"
                    j += 1
            else:
                name = str(k)
            table.append({"name": name, "composition": comp if comp is not None else "mixed",
                          "natoms": int(nat),
                          "order": None if order is None else np.frombuffer(order, dtype=np.uint8).astype(np.int64)})
            ids[k] = len(table) - 1
        return table, ids
