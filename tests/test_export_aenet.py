"""aenet .nn export: an independent reader (written from aenet's format description: list-directed
records as nnASCII2bin.x reads them, and aenet's fixed-column formatted records) plus an
independent numpy Chebyshev descriptor on ASE neighbour lists reproduce the model's energies."""
import math
import re

import numpy as np
import pytest
import torch

from distmlip.errors import DataFormatError, InputError
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 4.2, "n_radial": 5, "rc_angular": 3.3, "n_angular": 3, "backend": "reference"}


# ----------------------------------------------------------------- independent aenet reader
class ListDirected:
    """Token reader mimicking Fortran list-directed READ: each read starts a new record, takes as
    many blank/comma separated values as requested across records, ignores the rest of the last."""

    def __init__(self, text):
        self.lines = text.split("\n")
        self.pos = 0

    def read(self, n=1, conv=str):
        vals = []
        while len(vals) < n:
            toks = self.lines[self.pos].replace(",", " ").split()
            self.pos += 1
            vals.extend(toks[: n - len(vals)])
        return [conv(v) for v in vals]

    def one(self, conv=str):
        return self.read(1, conv)[0]


def fortran_float(s):
    return float(s.replace("D", "E").replace("d", "e"))


def fortran_logical(s):
    s = s.strip(".").upper()
    return s.startswith("T")


def read_nn_list_directed(text):
    r = ListDirected(text)
    net = {}
    net["nlayers"] = r.one(int)
    net["nnodes_max"] = r.one(int)
    net["Wsize"] = r.one(int)
    net["nvalues"] = r.one(int)
    nl = net["nlayers"]
    net["nnodes"] = r.read(nl, int)
    net["fun"] = r.read(nl - 1, int)
    net["iw"] = r.read(nl, int)
    net["iv"] = r.read(nl, int)
    net["W"] = np.array(r.read(net["Wsize"], fortran_float))
    stp = {"description": r.one(), "atomtype": r.one(), "nenv": r.one(int)}
    stp["envtypes"] = r.read(stp["nenv"])
    stp["rc_min"] = r.one(fortran_float)
    stp["rc_max"] = r.one(fortran_float)
    stp["sftype"] = r.one()
    stp["nsf"] = r.one(int)
    stp["nsfparam"] = r.one(int)
    nsf, npar = stp["nsf"], stp["nsfparam"]
    stp["sf"] = r.read(nsf, int)
    stp["sfparam"] = np.array(r.read(npar * nsf, fortran_float)).reshape(nsf, npar)  # column-major (npar, nsf)
    stp["sfenv"] = r.read(2 * nsf, int)
    stp["neval"] = r.one(int)
    for k in ("sfval_min", "sfval_max", "sfval_avg", "sfval_cov"):
        stp[k] = np.array(r.read(nsf, fortran_float))
    ts = {"file": r.one(), "normalized": fortran_logical(r.one()), "scale": r.one(fortran_float),
          "shift": r.one(fortran_float), "ntypes": r.one(int)}
    ts["type_names"] = r.read(ts["ntypes"])
    ts["E_atom"] = np.array(r.read(ts["ntypes"], fortran_float))
    ts["natomtot"] = r.one(int)
    ts["nstrucs"] = r.one(int)
    ts["E_min"], ts["E_max"], ts["E_avg"] = r.read(3, fortran_float)
    assert all(not ln.strip() for ln in r.lines[r.pos:]), "trailing data after the trainset section"
    return net, stp, ts


def read_formatted_block(lines, pos, n, width, conv):
    """Fortran formatted READ with '(4(1x,<w>))': 4 fixed-width fields per record after one blank
    column; blanks inside a field are ignored (BN), an empty field is 0."""
    vals = []
    while len(vals) < n:
        ln = lines[pos]
        pos += 1
        for k in range(4):
            if len(vals) == n:
                break
            field = ln[1 + k * (width + 1): 1 + k * (width + 1) + width].replace(" ", "")
            vals.append(conv(field) if field else conv("0"))
    return vals, pos


def check_formatted_layout(text, nenv):
    """Walk the file as aenet's load_*_ASCII do (formatted arrays) and return the sfval_avg/cov and
    W arrays, to check both readers agree."""
    L = text.split("\n")
    p = 0
    nl = int(L[p]); wsize = int(L[p + 2]); p += 4
    nn, p = read_formatted_block(L, p, nl, 17, int)
    _, p = read_formatted_block(L, p, nl - 1, 17, int)
    _, p = read_formatted_block(L, p, nl, 17, int)
    _, p = read_formatted_block(L, p, nl, 17, int)
    W, p = read_formatted_block(L, p, wsize, 24, float)
    p += 3  # description, atomtype, nenv
    p += nenv
    p += 2  # rc_min, rc_max
    p += 1  # sftype
    nsf = int(L[p]); p += 1
    npar = int(L[p]); p += 1
    _, p = read_formatted_block(L, p, nsf, 17, int)
    _, p = read_formatted_block(L, p, npar * nsf, 24, float)
    env, p = read_formatted_block(L, p, nenv * nsf, 17, int)
    assert all(v == 0 for v in env)
    int(L[p]); p += 1  # neval
    out = {}
    for k in ("min", "max", "avg", "cov"):
        out[k], p = read_formatted_block(L, p, nsf, 24, float)
    assert L[p + 1].strip() == "T"
    return np.array(W), np.array(out["avg"]), np.array(out["cov"])


def net_eval(net, x):
    """aenet ff_eval: W blocks reshaped (nnodes2, nnodes1+1) column-major, bias node = 1."""
    acts = {0: lambda v: v, 1: np.tanh, 2: lambda v: 1.0 / (1.0 + np.exp(-v))}
    vals = np.asarray(x, dtype=np.float64)
    for l in range(net["nlayers"] - 1):
        n1, n2 = net["nnodes"][l], net["nnodes"][l + 1]
        block = net["W"][net["iw"][l]:net["iw"][l + 1]].reshape((n2, n1 + 1), order="F")
        vals = acts[net["fun"][l]](block @ np.append(vals, 1.0))
    return vals[0]


# ----------------------------------------------------------------- independent descriptor
def cheb(x, n):
    T = [np.ones_like(x), x]
    for _ in range(2, n + 1):
        T.append(2 * x * T[-1] - T[-2])
    return np.array(T[: n + 1])


def aenet_descriptor(atoms, i, envtypes, rc_r, n_r, rc_a, n_a):
    """Chebyshev (AUC) fingerprint of atom i following Artrith, Urban, Ceder PRB 96, 014112."""
    from ase.neighborlist import neighbor_list

    I, J, D = neighbor_list("ijD", atoms, max(rc_r, rc_a))
    sel = I == i
    J, D = J[sel], D[sel]
    T = len(envtypes)
    s = -(T // 2)
    spins = []
    for _ in range(T):
        if s == 0 and T % 2 == 0:
            s += 1
        spins.append(s)
        s += 1
    sym = atoms.get_chemical_symbols()
    spin = np.array([spins[envtypes.index(sym[j])] for j in J], dtype=float)
    r = np.linalg.norm(D, axis=1)
    fc = lambda d, rc: np.where(d < rc, 0.5 * (np.cos(np.pi * d / rc) + 1), 0.0)  # noqa: E731
    rad = np.zeros(n_r + 1); rad_w = np.zeros(n_r + 1)
    for k in range(len(r)):
        if r[k] < rc_r:
            v = cheb(np.array(2 * r[k] / rc_r - 1), n_r) * fc(r[k], rc_r)
            rad += v; rad_w += spin[k] * v
    ang = np.zeros(n_a + 1); ang_w = np.zeros(n_a + 1)
    for a in range(len(r)):
        for b in range(a + 1, len(r)):
            if r[a] < rc_a and r[b] < rc_a:
                c = D[a] @ D[b] / (r[a] * r[b])
                v = cheb(np.array(c), n_a) * fc(r[a], rc_a) * fc(r[b], rc_a)
                ang += v; ang_w += spin[a] * spin[b] * v
    return np.concatenate([rad, ang, rad_w, ang_w]) if T > 1 else np.concatenate([rad, ang])


def aenet_energy(files, atoms):
    """Total energy as aenet evaluates it: E_i = net((G-avg)/sqrt(cov-avg^2))/scale + shift + E_atom."""
    E = 0.0
    for i, el in enumerate(atoms.get_chemical_symbols()):
        net, stp, ts = files[el]
        assert stp["sftype"].lower() == "chebyshev" and stp["atomtype"] == el
        rc_r, n_r, rc_a, n_a = stp["sfparam"][0]
        G = aenet_descriptor(atoms, i, stp["envtypes"], rc_r, int(round(n_r)), rc_a, int(round(n_a)))
        avg, cov = stp["sfval_avg"], stp["sfval_cov"]
        x = (G - avg) / np.sqrt(cov - avg * avg)
        E += net_eval(net, x) / ts["scale"] + ts["shift"] + ts["E_atom"][ts["type_names"].index(el)]
    return E


# ----------------------------------------------------------------- tests
def _random_model(species, activation="tanh", seed=0, dtype="float64"):
    torch.manual_seed(seed)
    m = BPNN(species, DESC, [7, 5], activation, dtype, reference_energies={s: -0.5 - k for k, s in enumerate(species)})
    for p in m.parameters():
        p.data.normal_(0.0, 0.4)
    g = torch.Generator().manual_seed(seed)
    m.ann.feature_mean.copy_(torch.randn(m.ann.feature_mean.shape, generator=g, dtype=torch.float64) * 3.0)
    m.ann.feature_std.copy_(torch.rand(m.ann.feature_std.shape, generator=g, dtype=torch.float64) * 2.0 + 0.05)
    m.ann.energy_shift.copy_(torch.randn(m.ann.energy_shift.shape, generator=g, dtype=torch.float64))
    m.ann.energy_scale.fill_(0.37)
    return m


def _structures(species, rng):
    from ase import Atoms
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.7, cubic=True)
    a.set_chemical_symbols([species[k % len(species)] for k in range(len(a))])
    a.rattle(0.15, seed=int(rng.integers(1000)))
    b = bulk("Cu", "bcc", a=2.9).repeat((2, 1, 1))          # small cell: atoms see their own images
    b.set_chemical_symbols([species[-1], species[0]])
    b.rattle(0.1, seed=int(rng.integers(1000)))
    mol = Atoms([species[k % len(species)] for k in range(5)], positions=rng.uniform(0, 3.5, (5, 3)))
    return [a, b, mol]


def _model_energy(m, atoms):
    from distmlip.evaluation.calculator import DistmlipCalculator

    atoms = atoms.copy()
    atoms.calc = DistmlipCalculator(m)
    return atoms.get_potential_energy()


@pytest.mark.parametrize("species,activation", [(["Cu", "Au"], "tanh"), (["Cu"], "sigmoid"),
                                                (["Cu", "Au", "Ni"], "tanh")])
def test_aenet_files_reproduce_model_energies(tmp_path, species, activation):
    from distmlip.evaluation.export_aenet import write_aenet

    m = _random_model(species, activation)
    paths = write_aenet(m, tmp_path / "nn", ascii=True)
    assert sorted(p.name.split(".")[0] for p in paths) == sorted(species)
    files = {}
    for p in paths:
        text = p.read_text()
        net, stp, ts = read_nn_list_directed(text)
        files[stp["atomtype"]] = (net, stp, ts)
        assert stp["envtypes"] == species and ts["type_names"] == species and ts["normalized"]
        assert net["nnodes"] == [m.dim, 7, 5, 1] and stp["nsf"] == m.dim
        # the formatted (fixed-column) reading of the same file gives the same arrays
        W, avg, cov = check_formatted_layout(text, len(species))
        np.testing.assert_array_equal(W, net["W"])
        np.testing.assert_array_equal(avg, stp["sfval_avg"])
        np.testing.assert_array_equal(cov, stp["sfval_cov"])
        assert all(len(ln) <= 100 for ln in text.split("\n") if re.search(r"E[+-]\d\d", ln))
    rng = np.random.default_rng(1)
    for atoms in _structures(species, rng):
        e_model = _model_energy(m, atoms)
        e_aenet = aenet_energy(files, atoms)
        assert math.isclose(e_model, e_aenet, rel_tol=1e-11, abs_tol=1e-10 * len(atoms)), (e_model, e_aenet)


def test_aenet_zbl_left_out_with_warning_refuses_committee_and_activation(tmp_path, capsys):
    from distmlip.evaluation.export_aenet import write_aenet

    m = BPNN(["Cu"], DESC, [4], "tanh", zbl={})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    files = {}
    for p in write_aenet(m, tmp_path / "zbl", ascii=True):
        net, stp, ts = read_nn_list_directed(p.read_text())
        files[stp["atomtype"]] = (net, stp, ts)
    err = capsys.readouterr().err
    assert "without the model's ZBL repulsion" in err and "Cu-Cu 1.98 A" in err
    # the files are the networks term: equal to the model where ZBL is zero, without it below
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    assert math.isclose(_model_energy(m, a), aenet_energy(files, a), rel_tol=1e-11, abs_tol=1e-9)
    a.positions[1] = a.positions[0] + [1.2, 0.0, 0.0]
    assert _model_energy(m, a) - aenet_energy(files, a) > 1.0
    m = BPNN(["Cu"], DESC, [4], "silu")
    with pytest.raises(InputError, match="activation"):
        write_aenet(m, tmp_path)
    # a committee (two model files) through the CLI
    from distmlip.cli import main

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    BPNN(["Cu"], DESC, [4]).save(a)
    BPNN(["Cu"], DESC, [4]).save(b)
    assert main(["export", "--format", "aenet", str(a), str(b), "-o", str(tmp_path / "o")]) == 2
    assert main(["export", "--format", "aenet", str(a), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "Cu.4t.nn").is_file()
    assert main(["export", "--format", "aenet", "--ascii", str(a), "-o", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "Cu.4t.nn").read_text().split()[0] == "3"


# ----------------------------------------------------------------- import (no aenet programs needed)
def _pytorch_layout(pot) -> str:
    """A potential written in aenet-PyTorch's ASCII layout (its output_nn.py): every array on one
    line, fixed-point reals, envtypes on one line, sfenv as 2*nsf integers, Python booleans."""
    net, stp, ts = pot.network, pot.setup, pot.trainset
    f = lambda v: "".join(f"{x:24.17f} " for x in v)                       # noqa: E731
    i = lambda v: "".join(f"{int(x):17d} " for x in v)                     # noqa: E731
    L = [f"{net.nlayers:17d}", f"{max(net.nnodes):17d}", f"{net.wsize:17d}", f"{net.nvalues:17d}",
         i(net.nnodes), i(net.f_a), i(net.iw), i(net.iv), f(net.W),
         stp.description, stp.atomtype, f"{len(stp.envtypes):17d}", " ".join(stp.envtypes) + " ",
         f"{stp.rc_min:24.17f}", f"{stp.rc_max:24.17f}", stp.sftype, f"{stp.nsf:17d}", f"{stp.nsfparam:17d}",
         i(stp.sf), f(np.asarray(stp.sfparam).reshape(-1)), i([0] * (2 * stp.nsf)), f"{stp.neval:17d}",
         f(stp.sfval_min), f(stp.sfval_max), f(stp.sfval_avg), f(stp.sfval_cov),
         ts.file, str(bool(ts.normalized)), repr(ts.scale), repr(ts.shift), str(len(ts.type_names)),
         " ".join(ts.type_names) + " ", " ".join(repr(float(e)) for e in ts.e_atom) + " ",
         str(ts.natomtot), str(ts.nstrucs), f"{ts.e_min!r} {ts.e_max!r} {ts.e_avg!r}"]
    return "\n".join(L) + "\n"


def test_import_reads_every_layout_and_reproduces_the_model(tmp_path):
    from distmlip.evaluation import aenet_nn
    from distmlip.evaluation.export_aenet import model_to_potentials
    from distmlip.evaluation.import_aenet import import_aenet

    species = ["Cu", "Au", "Ni"]
    m = _random_model(species, "tanh", seed=4)
    m.ann.feature_std.clamp_(min=0.5)        # fixed-point reals of the aenet-PyTorch layout keep 17 decimals
    pots = model_to_potentials(m, {"e_min": -3.0, "e_max": -2.0, "e_avg": -2.5, "n_structures": 7, "n_atoms": 30})
    layouts = {"binary": aenet_nn.to_binary, "ascii": aenet_nn.to_ascii, "pytorch": _pytorch_layout}
    rng = np.random.default_rng(2)
    structs = _structures(species, rng)
    e_model = [_model_energy(m, a) for a in structs]
    for name, write in layouts.items():
        paths = []
        for p in pots:
            path = tmp_path / name / f"{p.element}.nn"
            path.parent.mkdir(exist_ok=True)
            data = write(p)
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
            paths.append(path)
        imp, read = import_aenet(paths[::-1])               # any file order
        assert imp.species == species and [r.layout for r in read] == ["binary" if name == "binary" else "ascii"] * 3
        assert imp.metadata["training_set"]["n_structures"] == 7
        np.testing.assert_allclose(imp.metadata["training_set"]["e_min"], -3.0, rtol=1e-13)
        for a, e in zip(structs, e_model):
            assert math.isclose(_model_energy(imp, a), e, rel_tol=1e-11, abs_tol=1e-9 * len(a)), (name, e)


def test_import_pads_narrower_networks_and_refuses_what_it_cannot_hold(tmp_path):
    import dataclasses

    from distmlip.evaluation import aenet_nn
    from distmlip.evaluation.export_aenet import model_to_potentials
    from distmlip.evaluation.import_aenet import import_aenet, potentials_to_model

    species = ["Cu", "Au"]
    wide = model_to_potentials(_random_model(species, "sigmoid", seed=1))
    narrow = model_to_potentials(_random_model(species, "sigmoid", seed=2).__class__(
        species, DESC, [4, 3], "sigmoid", reference_energies={"Cu": -0.5, "Au": -1.5}))
    mixed = [narrow[0], wide[1]]                           # Cu 4-3, Au 7-5
    m = potentials_to_model(mixed)
    assert m.ann.hidden == [7, 5]
    files = {}
    for p in mixed:
        text = aenet_nn.to_ascii(p)
        files[p.element] = read_nn_list_directed(text)
    for a in _structures(species, np.random.default_rng(3)):
        assert math.isclose(_model_energy(m, a), aenet_energy(files, a), rel_tol=1e-11, abs_tol=1e-9 * len(a))
    # refusals with a reason
    behler = dataclasses.replace(wide[0], setup=dataclasses.replace(wide[0].setup, sftype="Behler2011"))
    with pytest.raises(InputError, match="symmetry functions"):
        potentials_to_model([behler, wide[1]])
    with pytest.raises(InputError, match="no potential file for"):
        potentials_to_model([wide[0]])
    deep = model_to_potentials(_random_model(species, "tanh", seed=3).__class__(species, DESC, [4], "tanh"))
    with pytest.raises(InputError, match="one depth"):
        potentials_to_model([deep[0], wide[1]])
    other_order = dataclasses.replace(wide[1], setup=dataclasses.replace(wide[1].setup, envtypes=["Au", "Cu"]))
    with pytest.raises(InputError, match="species order"):
        potentials_to_model([wide[0], other_order])
    bad = tmp_path / "bad.nn"
    bad.write_bytes(aenet_nn.to_binary(wide[0])[:500])
    with pytest.raises(DataFormatError, match="bad.nn"):
        import_aenet([bad])
