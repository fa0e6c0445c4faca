"""Train / validation / test splits: 0 = train, 1 = validation, 2 = test.

``assign_split`` is stable: a structure's split depends only on the seed and its identity
(last directory + file name of its source, and its frame index), hashed with blake2b, so it is
the same on every machine, for every MPI layout and when the data set is rebuilt from the same
files in another folder.  Synthetic structures that keep their parent's source and frame index
therefore land in their parent's split.

``per_subset=True`` stratifies: inside each subset the identities are ordered by their hash
and the fractions are applied exactly (rounded) to the number of identities, so every subset is
represented in each split, and a data set augmented with GPR copies (which share their parent's
identity) puts every reference in the split it had before augmentation.  The price of exact
counts: when a subset GROWS (new frames appended to a DFT file), the cuts move with its size, and
an identity whose hash lies near a cut can change split (sweep 14: 1 of 30 old frames went from
training to validation when the subset grew to 45).  A warm start on grown data may then
validate on a few structures the model was trained on; where that matters, fix the split in the
data (``convert --split-by-pattern``, or keep new frames in new files and name them in
``data.validation``) or use ``data.by_subset: false`` (the hash alone decides: an identity never
changes split, but a small subset may miss a split).

A split can also be stored in the data set (optional ``structures/split``, written by
``distmlip convert --split-by-pattern train=train/,test=test/``); ``get_split`` prefers it."""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from ..errors import ConfigError, InputError

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "validation": VAL, "valid": VAL, "test": TEST}


def structure_identity(source: str, source_index: int) -> str:
    p = os.path.normpath(str(source))
    parent = os.path.basename(os.path.dirname(p))
    return f"{parent}/{os.path.basename(p)}#{int(source_index)}"


def hash_uniform(seed: int, identities) -> np.ndarray:
    """Uniform numbers in [0, 1) from blake2b(seed, identity); machine independent."""
    out = np.empty(len(identities), dtype=np.float64)
    key = str(int(seed)).encode()
    for k, ident in enumerate(identities):
        h = hashlib.blake2b(ident.encode(), digest_size=8, key=key).digest()
        out[k] = (int.from_bytes(h, "little") >> 11) / float(1 << 53)
    return out


def _check_fractions(fractions) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) == 2:
        f = (f[0], 0.0, f[1])
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions (data.fractions, --fractions) must be 3 non-negative numbers "
                          f"summing to 1 (train, validation, test), got {list(fractions)}")
    return f


def assign_split_arrays(sources, source_index, subset_ids, seed: int, fractions=(0.8, 0.1, 0.1),
                        per_subset: bool = True) -> np.ndarray:
    f = _check_fractions(fractions)
    ids = [structure_identity(s, i) for s, i in zip(sources, source_index)]
    u = hash_uniform(seed, ids)
    out = np.empty(len(u), dtype=np.int8)
    if not per_subset:
        out[:] = np.where(u < f[0], TRAIN, np.where(u < f[0] + f[1], VAL, TEST))
        return out
    subset_ids = np.asarray(subset_ids)
    for sid in np.unique(subset_ids):
        members = np.flatnonzero(subset_ids == sid)
        # the fractions count identities, not structures: a reference and its GPR copies share
        # one identity, so they are never cut apart, and the references fall into the same
        # splits before and after augmentation (counting structures moved the cuts with the
        # number of copies: 2-4 of 42 references changed split, test ones into validation)
        _, group = np.unique(u[members], return_inverse=True)     # rank of each identity's hash
        g = int(group.max()) + 1 if len(group) else 0
        a = int(round(f[0] * g))
        b = max(a, int(round((f[0] + f[1]) * g)))
        out[members] = np.where(group < a, TRAIN, np.where(group < b, VAL, TEST))
    return out


def assign_split(ds, seed: int, fractions=(0.8, 0.1, 0.1), per_subset: bool = True,
                 by_subset: bool | None = None) -> np.ndarray:
    """Split of every structure of H5Dataset ``ds`` -> int8 array of 0/1/2 (train/val/test).
    ``by_subset`` is an alias of ``per_subset``."""
    if by_subset is not None:
        per_subset = by_subset
    return assign_split_arrays(ds.column("source"), ds.column("source_index"), ds.subset_ids, seed,
                               fractions, per_subset)


def get_split(ds, seed: int, fractions=(0.8, 0.1, 0.1), per_subset: bool = True,
              use_stored: bool = True) -> np.ndarray:
    """The data set's stored split if it has one (and ``use_stored``), else ``assign_split``."""
    if use_stored and ds.has_stored_split:
        return np.asarray(ds.column("split"), dtype=np.int8)
    return assign_split(ds, seed, fractions, per_subset)


def split_of(ds, seed: int, fractions, by_subset: bool = True, use_stored: bool = True,
             patterns=None) -> np.ndarray:
    """Split code (0 train, 1 val, 2 test) per structure, by the training configuration's rules
    (``data.split_patterns``, else the stored split, else the hash split): the one rule that
    training and ``evaluate --split`` both apply, so that a held-out split is scored as held out."""
    if patterns:
        return np.asarray(split_from_patterns(ds.column("source"), parse_split_patterns(patterns)))
    sp = np.asarray(get_split(ds, seed, tuple(fractions), per_subset=by_subset, use_stored=use_stored))
    f_train, f_val = float(fractions[0]), float(fractions[1])
    if use_stored and ds.has_stored_split and f_val > 0 and not (sp == VAL).any() and f_train + f_val > 0:
        # a stored split of training and test structures only (convert --split-by-pattern
        # train=...,test=...: README's pipeline) gave no validation set at all, whatever
        # data.fractions said; the validation share is now drawn from its training part by the
        # hash rule, with the fractions' train : validation ratio
        tr = np.flatnonzero(sp == TRAIN)
        if len(tr):
            sub = assign_split_arrays(np.asarray(ds.column("source"))[tr], np.asarray(ds.column("source_index"))[tr],
                                      np.asarray(ds.subset_ids)[tr], seed,
                                      (f_train / (f_train + f_val), f_val / (f_train + f_val), 0.0), by_subset)
            sp = sp.copy()
            sp[tr[sub == VAL]] = VAL
    return sp


def parse_split_patterns(text) -> dict[str, str]:
    """'train=train/,test=test/' (or a dict) -> {'train': 'train/', 'test': 'test/'}."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"split pattern {part!r} must look like NAME=REGEX (NAME: train, val, test)")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        if k.lower() not in SPLIT_NAMES:
            raise ConfigError(f"split name {k!r} must be one of train, val, test")
        try:
            re.compile(v)
        except re.error as exc:
            raise ConfigError(f"split pattern {v!r} is not a valid regular expression: {exc}") from None
        out[k.lower()] = v
    if not out:
        raise ConfigError("empty split pattern")
    return out


def split_from_patterns(sources, patterns: dict[str, str], source_index=None) -> np.ndarray:
    """Split by regular expressions searched in each source path; the first matching pattern
    (in the order given) wins; a path matching none is an InputError."""
    rx = [(SPLIT_NAMES[k], re.compile(v)) for k, v in patterns.items()]
    out = np.empty(len(sources), dtype=np.int8)
    for n, s in enumerate(sources):
        for val, r in rx:
            if r.search(str(s)):
                out[n] = val
                break
        else:
            where = f" structure {source_index[n]}" if source_index is not None else ""
            raise InputError(f"{s}:{where} field 'split': source path matches none of the split patterns "
                             f"{patterns}")
    return out
