"""aenet potential files (``.nn``): the three sections as values, read and written in aenet's
binary layout and in the ASCII layouts.

One file per element holds, in this order (aenet 2.0.4, src/ext/feedforward.f90 ``Network``,
src/sfsetup.f90 ``Setup``, src/trainset.f90 ``TrnSet``):

network   nlayers, nnodes_max, Wsize, nvalues, nnodes(nlayers), f_a(2:nlayers), iw(nlayers),
          iv(nlayers), W(Wsize).  Layer l's block W(iw(l)+1 : iw(l+1)) is the
          nnodes(l+1) x (nnodes(l)+1) matrix in column-major order, its last column the bias.
          f_a: 0 linear, 1 tanh, 2 sigmoid, 3 mtanh, 4 twist.
setup     description (1024 characters), atomtype (2), nenv, envtypes(nenv) (2 each), Rc_min,
          Rc_max, sftype (100), nsf, nsfparam, sf(nsf), sfparam(nsfparam, nsf), sfenv(2, nsf),
          neval, sfval_min(nsf), sfval_max(nsf), sfval_avg(nsf), sfval_cov(nsf).  For the
          Chebyshev basis only sfparam(1:4, 1) is used: radial Rc, radial order, angular Rc,
          angular order.
trainset  file (1024), normalized (logical), scale, shift, ntypes, type names(ntypes) (2 each),
          E_atom(ntypes), natomtot, nstrucs, (E_min, E_max, E_avg) in one record.

**Binary** (what aenet's ``load_NNPot`` reads, used by predict.x, train.x restarts and both
LAMMPS interfaces): Fortran unformatted sequential, one record per item above; each record is
its bytes framed by a 4-byte length before and after (gfortran's default), integers and logicals
4 bytes, reals 8 bytes, strings blank-padded to their declared length, little-endian.  The reader
also accepts big-endian files and 8-byte record markers (older compilers/options).

**ASCII**: aenet's ``save_*_ASCII`` layout (scalars on their own lines, arrays as
'(4(1x,I17))' / '(4(1x,ES24.17))' records) is written; the reader follows Fortran list-directed
reading (values separated by blanks, an array continuing over lines), which also reads the
layout aenet-PyTorch writes (each array on one line, sfenv as 2*nsf values).  Strings are whole
lines.  The sfenv block has nenv*nsf values in aenet's layout and 2*nsf in aenet-PyTorch's: the
reader takes every integer up to the first line holding a real number, the last of them being
neval.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataFormatError, InputError

DESCRIPTION_LEN = 1024   # Setup%description
TYPELEN = 2              # aeio TYPELEN: species names
SFTYPE_LEN = 100         # Setup%sftype
PATHLEN = 1024           # TrnSet%file
NENV_MAX = 2             # rows of Setup%sfenv in the binary record
NSFPARAM = 4


# ----------------------------------------------------------------------------------- values
@dataclass
class Network:
    nnodes: list            # layer sizes, input first, output (1) last
    f_a: list               # activation codes of layers 2..nlayers
    W: np.ndarray           # float64 [Wsize]

    @property
    def nlayers(self) -> int:
        return len(self.nnodes)

    @property
    def iw(self) -> list:
        out = [0]
        for k in range(self.nlayers - 1):
            out.append(out[-1] + (self.nnodes[k] + 1) * self.nnodes[k + 1])
        return out

    @property
    def iv(self) -> list:
        out = [0]
        for k in range(self.nlayers - 1):
            out.append(out[-1] + self.nnodes[k] + 1)
        return out

    @property
    def wsize(self) -> int:
        return self.iw[-1]

    @property
    def nvalues(self) -> int:
        return self.iv[-1] + self.nnodes[-1]

    def layers(self) -> list:
        """[(weight [out, in], bias [out])] per layer, float64."""
        iw = self.iw
        out = []
        for k in range(self.nlayers - 1):
            n1, n2 = self.nnodes[k], self.nnodes[k + 1]
            block = np.asarray(self.W[iw[k]:iw[k + 1]], dtype=np.float64).reshape((n2, n1 + 1), order="F")
            out.append((block[:, :n1].copy(), block[:, n1].copy()))
        return out

    @classmethod
    def from_layers(cls, layers, codes) -> "Network":
        """From [(weight [out, in], bias [out])] and the activation codes of layers 2..n."""
        sizes = [int(layers[0][0].shape[1])] + [int(W.shape[0]) for W, _ in layers]
        W = np.concatenate([np.concatenate([np.asarray(Wl, np.float64), np.asarray(bl, np.float64)[:, None]],
                                           axis=1).flatten(order="F") for Wl, bl in layers])
        return cls(sizes, [int(c) for c in codes], W)


@dataclass
class Setup:
    description: str
    atomtype: str
    envtypes: list
    rc_min: float
    rc_max: float
    sftype: str
    sf: np.ndarray                    # int [nsf]
    sfparam: np.ndarray               # float64 [nsf, nsfparam] (Fortran sfparam(:, isf) = row isf)
    sfenv: np.ndarray                 # int, flat, as stored
    neval: int
    sfval_min: np.ndarray
    sfval_max: np.ndarray
    sfval_avg: np.ndarray
    sfval_cov: np.ndarray

    @property
    def nsf(self) -> int:
        return int(len(self.sf))

    @property
    def nsfparam(self) -> int:
        return int(self.sfparam.shape[1])

    def chebyshev(self) -> tuple:
        """(rc_radial, n_radial, rc_angular, n_angular) of a Chebyshev setup."""
        p = self.sfparam[0]
        return float(p[0]), int(round(p[1])), float(p[2]), int(round(p[3]))


@dataclass
class TrainsetInfo:
    file: str
    normalized: bool
    scale: float
    shift: float
    type_names: list
    e_atom: np.ndarray
    natomtot: int
    nstrucs: int
    e_min: float
    e_max: float
    e_avg: float


@dataclass
class Potential:
    network: Network
    setup: Setup
    trainset: TrainsetInfo
    path: str = ""
    layout: str = "binary"            # binary | ascii (as read)
    notes: list = field(default_factory=list)

    @property
    def element(self) -> str:
        return self.setup.atomtype

    @property
    def e_atom(self) -> float:
        """The free-atom (reference) energy of this file's element."""
        names = list(self.trainset.type_names)
        if self.element not in names:
            raise DataFormatError(f"{self.path}: element {self.element} is not among the training-set "
                                  f"types {names}")
        return float(self.trainset.e_atom[names.index(self.element)])


# ----------------------------------------------------------------------------------- binary
class _RecordWriter:
    def __init__(self):
        self.parts: list[bytes] = []

    def record(self, payload: bytes) -> None:
        n = struct.pack("<i", len(payload))
        self.parts += [n, payload, n]

    def ints(self, values) -> None:
        self.record(np.asarray(values, dtype="<i4").tobytes())

    def reals(self, values) -> None:
        v = np.asarray(values, dtype="<f8")
        if not np.all(np.isfinite(v)):
            raise InputError("aenet export: a value of the model is not finite")
        self.record(v.tobytes())

    def string(self, s: str, length: int) -> None:
        b = str(s).encode("ascii", "replace")
        if len(b) > length:
            raise InputError(f"aenet export: {s!r} is longer than aenet's {length} characters")
        self.record(b.ljust(length, b" "))

    def strings(self, values, length: int) -> None:
        out = b""
        for s in values:
            b = str(s).encode("ascii", "replace")
            if len(b) > length:
                raise InputError(f"aenet export: species name {s!r} is longer than aenet's {length} characters")
            out += b.ljust(length, b" ")
        self.record(out)

    def data(self) -> bytes:
        return b"".join(self.parts)


def to_binary(pot: Potential) -> bytes:
    """The file's bytes in aenet's binary (unformatted sequential) layout."""
    w = _RecordWriter()
    net, stp, ts = pot.network, pot.setup, pot.trainset
    for v in (net.nlayers, max(net.nnodes), net.wsize, net.nvalues):
        w.ints([v])
    w.ints(net.nnodes)
    w.ints(net.f_a)
    w.ints(net.iw)
    w.ints(net.iv)
    w.reals(net.W)
    w.string(stp.description, DESCRIPTION_LEN)
    w.string(stp.atomtype, TYPELEN)
    w.ints([len(stp.envtypes)])
    w.strings(stp.envtypes, TYPELEN)
    w.reals([stp.rc_min])
    w.reals([stp.rc_max])
    w.string(stp.sftype, SFTYPE_LEN)
    w.ints([stp.nsf])
    w.ints([stp.nsfparam])
    w.ints(stp.sf)
    w.reals(np.asarray(stp.sfparam, np.float64).reshape(-1))      # row isf = Fortran column isf
    env = np.zeros(NENV_MAX * stp.nsf, dtype=np.int64)
    src = np.asarray(stp.sfenv, dtype=np.int64).reshape(-1)[: env.size]
    env[: src.size] = src
    w.ints(env)
    w.ints([stp.neval])
    for arr in (stp.sfval_min, stp.sfval_max, stp.sfval_avg, stp.sfval_cov):
        w.reals(arr)
    w.string(ts.file, PATHLEN)
    w.ints([1 if ts.normalized else 0])
    w.reals([ts.scale])
    w.reals([ts.shift])
    w.ints([len(ts.type_names)])
    w.strings(ts.type_names, TYPELEN)
    w.reals(ts.e_atom)
    w.ints([ts.natomtot])
    w.ints([ts.nstrucs])
    w.reals([ts.e_min, ts.e_max, ts.e_avg])
    return w.data()


class _RecordReader:
    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0
        self.endian, self.marker = _detect_markers(data, path)
        self.n = 0

    def record(self, what: str) -> bytes:
        m, e = self.marker, self.endian
        fmt = e + ("i" if m == 4 else "q")
        if self.pos + m > len(self.data):
            raise DataFormatError(f"{self.path}: file ends before record {self.n + 1} ({what}): truncated or "
                                  f"not an aenet potential file")
        (n,) = struct.unpack_from(fmt, self.data, self.pos)
        start = self.pos + m
        end = start + n
        if n < 0 or end + m > len(self.data):
            raise DataFormatError(f"{self.path}: record {self.n + 1} ({what}) has a bad length {n}")
        (n2,) = struct.unpack_from(fmt, self.data, end)
        if n2 != n:
            raise DataFormatError(f"{self.path}: record {self.n + 1} ({what}) is not framed consistently "
                                  f"({n} != {n2}): not an aenet binary potential file")
        self.pos = end + m
        self.n += 1
        return self.data[start:end]

    def ints(self, what: str, count: int | None = None) -> np.ndarray:
        b = self.record(what)
        v = np.frombuffer(b, dtype=self.endian + "i4")
        if count is not None:
            if v.size < count:
                raise DataFormatError(f"{self.path}: record {self.n} ({what}) holds {v.size} integers, "
                                      f"{count} expected")
            v = v[:count]
        return v.astype(np.int64)

    def int1(self, what: str) -> int:
        return int(self.ints(what, 1)[0])

    def reals(self, what: str, count: int | None = None) -> np.ndarray:
        b = self.record(what)
        v = np.frombuffer(b[: len(b) // 8 * 8], dtype=self.endian + "f8")
        if count is not None:
            if v.size < count:
                raise DataFormatError(f"{self.path}: record {self.n} ({what}) holds {v.size} reals, "
                                      f"{count} expected")
            v = v[:count]
        return v.astype(np.float64)

    def string(self, what: str) -> str:
        return self.record(what).decode("ascii", "replace").rstrip()

    def strings(self, what: str, count: int) -> list:
        b = self.record(what)
        if count == 0:
            return []
        L = len(b) // count
        return [b[k * L:(k + 1) * L].decode("ascii", "replace").strip() for k in range(count)]


def _detect_markers(data: bytes, path: str):
    """(endianness, marker bytes) of a Fortran sequential file whose first record is one
    4-byte integer (nlayers)."""
    for endian in ("<", ">"):
        if len(data) >= 12 and struct.unpack_from(endian + "i", data, 0)[0] == 4 \
                and struct.unpack_from(endian + "i", data, 8)[0] == 4:
            return endian, 4
        if len(data) >= 20 and struct.unpack_from(endian + "q", data, 0)[0] == 4 \
                and struct.unpack_from(endian + "q", data, 12)[0] == 4:
            return endian, 8
    raise DataFormatError(f"{path}: not an aenet binary potential file (the first record is not one integer)")


def is_binary(data: bytes) -> bool:
    try:
        _detect_markers(data, "")
        return True
    except DataFormatError:
        return False


def from_binary(data: bytes, path: str = "<bytes>") -> Potential:
    r = _RecordReader(data, path)
    nlayers = r.int1("nlayers")
    if not 2 <= nlayers <= 1000:
        raise DataFormatError(f"{path}: {nlayers} network layers: not an aenet potential file")
    r.int1("nnodes_max")
    wsize = r.int1("Wsize")
    r.int1("nvalues")
    nnodes = [int(v) for v in r.ints("nnodes", nlayers)]
    f_a = [int(v) for v in r.ints("f_a", nlayers - 1)]
    r.ints("iw", nlayers)
    r.ints("iv", nlayers)
    W = r.reals("W", wsize)
    net = Network(nnodes, f_a, W)
    if net.wsize != wsize:
        raise DataFormatError(f"{path}: Wsize {wsize} does not match the layer sizes {nnodes}")
    description = r.string("description")
    atomtype = r.string("atomtype")
    nenv = r.int1("nenv")
    envtypes = r.strings("envtypes", nenv)
    rc_min = float(r.reals("Rc_min", 1)[0])
    rc_max = float(r.reals("Rc_max", 1)[0])
    sftype = r.string("sftype")
    nsf = r.int1("nsf")
    nsfparam = r.int1("nsfparam")
    sf = r.ints("sf", nsf)
    sfparam = r.reals("sfparam", nsfparam * nsf).reshape(nsf, nsfparam)
    sfenv = r.ints("sfenv")
    neval = r.int1("neval")
    vals = [r.reals(k, nsf) for k in ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov")]
    stp = Setup(description, atomtype, envtypes, rc_min, rc_max, sftype, sf, sfparam, sfenv, neval, *vals)
    tfile = r.string("trainset file")
    normalized = bool(r.int1("normalized"))
    scale = float(r.reals("scale", 1)[0])
    shift = float(r.reals("shift", 1)[0])
    ntypes = r.int1("ntypes")
    names = r.strings("type names", ntypes)
    e_atom = r.reals("E_atom", ntypes)
    natomtot = r.int1("natomtot")
    nstrucs = r.int1("nstrucs")
    e3 = r.reals("E_min, E_max, E_avg", 3)
    ts = TrainsetInfo(tfile, normalized, scale, shift, names, e_atom, natomtot, nstrucs, *map(float, e3))
    pot = Potential(net, stp, ts, path=path, layout="binary")
    if r.pos != len(data):
        pot.notes.append(f"{len(data) - r.pos} bytes after the training-set record were ignored")
    return pot


# ----------------------------------------------------------------------------------- ASCII
def _ascii_ints(values) -> list:
    vals = [int(v) for v in values]
    return ["".join(f" {v:17d}" for v in vals[k:k + 4]) for k in range(0, len(vals), 4)] or [""]


def _ascii_reals(values) -> list:
    vals = [float(v) for v in values]
    for v in vals:
        if not math.isfinite(v) or abs(v) >= 1e99:
            raise InputError(f"aenet export: value {v} does not fit aenet's ES24.17 fields")
    vals = [0.0 if abs(v) < 1e-99 else v for v in vals]  # three-digit exponents do not fit either
    return ["".join(f" {v:24.17E}" for v in vals[k:k + 4]) for k in range(0, len(vals), 4)] or [""]


def _token(s: str) -> str:
    """A string as one token: list-directed readers (nnASCII2bin.x) stop at blanks and slashes."""
    t = "".join(c if (c.isalnum() or c in "._-+") else "_" for c in str(s))
    return t or "distmlip"


def to_ascii(pot: Potential) -> str:
    """The file in aenet's ASCII layout (readable by aenet's load_*_ASCII and by nnASCII2bin.x).

    The sfenv block: aenet's formatted reader reads nenv*nsf integers, nnASCII2bin's list-directed
    reader 2*nsf.  Both are satisfied by ceil(nenv*nsf/4) records of which the last holds 2*nsf
    zeros separated by blanks and the others are blank (a formatted I17 read of blanks gives 0)."""
    net, stp, ts = pot.network, pot.setup, pot.trainset
    L = [f" {net.nlayers}", f" {max(net.nnodes)}", f" {net.wsize}", f" {net.nvalues}"]
    L += _ascii_ints(net.nnodes) + _ascii_ints(net.f_a) + _ascii_ints(net.iw) + _ascii_ints(net.iv)
    L += _ascii_reals(net.W)
    nenv, nsf = len(stp.envtypes), stp.nsf
    env = np.zeros(2 * nsf, dtype=np.int64)
    src = np.asarray(stp.sfenv, dtype=np.int64).reshape(-1)[: env.size]
    env[: src.size] = src
    n_env_records = max(1, -(-nenv * nsf // 4))
    sfenv = [""] * (n_env_records - 1) + [" " + " ".join(str(int(v)) for v in env)]
    L += [_token(stp.description), stp.atomtype, f" {nenv}"] + list(stp.envtypes)
    L += [f" {stp.rc_min:.17E}", f" {stp.rc_max:.17E}", _token(stp.sftype), f" {nsf}", f" {stp.nsfparam}"]
    L += _ascii_ints(stp.sf) + _ascii_reals(np.asarray(stp.sfparam).reshape(-1)) + sfenv + [f" {int(stp.neval)}"]
    for arr in (stp.sfval_min, stp.sfval_max, stp.sfval_avg, stp.sfval_cov):
        L += _ascii_reals(arr)
    L += [_token(ts.file), " T" if ts.normalized else " F", f" {ts.scale:.17E}", f" {ts.shift:.17E}",
          f" {len(ts.type_names)}"] + list(ts.type_names) + _ascii_reals(ts.e_atom)
    L += [f" {int(ts.natomtot)}", f" {int(ts.nstrucs)}", f" {ts.e_min:.17E} {ts.e_max:.17E} {ts.e_avg:.17E}"]
    return "\n".join(L) + "\n"


def _fortran_real(tok: str) -> float:
    t = tok.strip().rstrip(",")
    try:
        return float(t.replace("D", "E").replace("d", "e"))
    except ValueError:
        # Fortran may drop the exponent letter of a three-digit exponent: 1.0-100
        for k in range(len(t) - 1, 0, -1):
            if t[k] in "+-" and t[k - 1] not in "eE":
                return float(t[:k] + "E" + t[k:])
        raise


def _is_real_token(tok: str) -> bool:
    return any(c in tok for c in ".eEdD") and not tok.upper() in ("T", "F", ".T.", ".F.")


class _ListDirected:
    """Fortran list-directed reading over lines: each read starts at a new line, takes values
    across lines as needed and drops the rest of its last line.  ``r*v`` repeat counts are
    expanded."""

    def __init__(self, text: str, path: str):
        self.lines = text.splitlines()
        self.pos = 0
        self.path = path

    def _tokens(self, line: str) -> list:
        out = []
        for tok in line.replace(",", " ").split():
            if "*" in tok:
                r, _, v = tok.partition("*")
                if r.isdigit():
                    out += [v] * int(r)
                    continue
            out.append(tok)
        return out

    def values(self, n: int, what: str) -> list:
        vals: list = []
        while len(vals) < n:
            if self.pos >= len(self.lines):
                raise DataFormatError(f"{self.path}: file ends while reading {what} ({len(vals)} of {n} values)")
            vals += self._tokens(self.lines[self.pos])
            self.pos += 1
        return vals[:n]

    def line(self, what: str) -> str:
        if self.pos >= len(self.lines):
            raise DataFormatError(f"{self.path}: file ends while reading {what}")
        s = self.lines[self.pos].strip()
        self.pos += 1
        return s

    def ints(self, n: int, what: str) -> list:
        try:
            return [int(v) for v in self.values(n, what)]
        except ValueError as exc:
            raise DataFormatError(f"{self.path}: line {self.pos}: {what}: {exc}") from None

    def reals(self, n: int, what: str) -> np.ndarray:
        try:
            return np.array([_fortran_real(v) for v in self.values(n, what)], dtype=np.float64)
        except ValueError as exc:
            raise DataFormatError(f"{self.path}: line {self.pos}: {what}: {exc}") from None


def from_ascii(text: str, path: str = "<text>") -> Potential:
    r = _ListDirected(text, path)
    nlayers = r.ints(1, "nlayers")[0]
    if not 2 <= nlayers <= 1000:
        raise DataFormatError(f"{path}: {nlayers} network layers: not an aenet potential file")
    r.ints(1, "nnodes_max")
    wsize = r.ints(1, "Wsize")[0]
    r.ints(1, "nvalues")
    nnodes = r.ints(nlayers, "nnodes")
    f_a = r.ints(nlayers - 1, "f_a")
    r.ints(nlayers, "iw")
    r.ints(nlayers, "iv")
    W = r.reals(wsize, "W")
    net = Network(nnodes, f_a, W)
    if net.wsize != wsize:
        raise DataFormatError(f"{path}: Wsize {wsize} does not match the layer sizes {nnodes}")
    description = r.line("description")
    atomtype = (r.line("atomtype").split() or [""])[0]
    nenv = r.ints(1, "nenv")[0]
    envtypes = [str(v) for v in r.values(nenv, "envtypes")]
    rc_min = float(r.reals(1, "Rc_min")[0])
    rc_max = float(r.reals(1, "Rc_max")[0])
    sftype = r.line("sftype")
    nsf = r.ints(1, "nsf")[0]
    nsfparam = r.ints(1, "nsfparam")[0]
    sf = np.array(r.ints(nsf, "sf"), dtype=np.int64)
    sfparam = r.reals(nsfparam * nsf, "sfparam").reshape(nsf, nsfparam)
    # sfenv (nenv*nsf or 2*nsf integers, possibly blank lines) and neval: every integer up to the
    # first line with a real number
    ints: list = []
    while True:
        if r.pos >= len(r.lines):
            raise DataFormatError(f"{path}: file ends while reading sfenv/neval")
        toks = r._tokens(r.lines[r.pos])
        if any(_is_real_token(t) for t in toks):
            break
        try:
            ints += [int(t) for t in toks]
        except ValueError as exc:
            raise DataFormatError(f"{path}: line {r.pos + 1}: sfenv/neval: {exc}") from None
        r.pos += 1
    if not ints:
        raise DataFormatError(f"{path}: no neval before the descriptor statistics")
    neval = ints[-1]
    sfenv = np.array(ints[:-1], dtype=np.int64)
    vals = [r.reals(nsf, k) for k in ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov")]
    stp = Setup(description, atomtype, envtypes, rc_min, rc_max, sftype, sf, sfparam, sfenv, neval, *vals)
    tfile = r.line("trainset file")
    tok = r.values(1, "normalized")[0].strip(".").upper()
    normalized = tok.startswith("T")
    scale = float(r.reals(1, "scale")[0])
    shift = float(r.reals(1, "shift")[0])
    ntypes = r.ints(1, "ntypes")[0]
    names = [str(v) for v in r.values(ntypes, "type names")]
    e_atom = r.reals(ntypes, "E_atom")
    natomtot = r.ints(1, "natomtot")[0]
    nstrucs = r.ints(1, "nstrucs")[0]
    e3 = r.reals(3, "E_min, E_max, E_avg")
    ts = TrainsetInfo(tfile, normalized, scale, shift, names, e_atom, natomtot, nstrucs, *map(float, e3))
    return Potential(net, stp, ts, path=path, layout="ascii")


# ----------------------------------------------------------------------------------- files
def read_potential(path) -> Potential:
    """A binary or ASCII ``.nn`` file (detected from its first bytes)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"aenet potential file {path} does not exist")
    data = path.read_bytes()
    if is_binary(data):
        return from_binary(data, str(path))
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: neither an aenet binary potential file nor ASCII text") from None
    return from_ascii(text, str(path))


def write_potential(pot: Potential, path, ascii: bool = False) -> Path:
    from ..utils.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        if ascii:
            tmp.write_text(to_ascii(pot))
        else:
            tmp.write_bytes(to_binary(pot))
    return path
