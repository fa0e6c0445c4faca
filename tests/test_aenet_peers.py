"""distmlip against the real aenet 2.0.4 programs (tests/aenet_peers.py finds them; these tests
skip without them or without the shared EC-dimer data):

* generate.x's descriptors equal distmlip's (reference and fused kernels) on EC dimers, periodic
  EMT cells and a tiny triclinic cell;
* ``distmlip export --format aenet`` files, as written, give predict.x the model's energies and
  forces (tanh, sigmoid, linear, mtanh/twist layers, float64 and float32 networks, species orders);
* a potential trained by train.x, imported, gives predict.x's energies; exported again, a train.x
  restart starts from the same errors; retrained under ``mpirun -n 2`` from it and exported, it
  is still what predict.x computes."""
from __future__ import annotations

import glob
import shutil

import numpy as np
import pytest
import torch

import aenet_peers as AP
from helpers import distmlip_cli, mpirun, require_shared

EC_DESC = {"rc_radial": 6.5, "n_radial": 12, "rc_angular": 4.0, "n_angular": 4}
EMT_DESC = {"rc_radial": 5.0, "n_radial": 8, "rc_angular": 3.5, "n_angular": 3}
EC_REF = {"H": -13.6, "C": -1029.5, "O": -2041.0}


# ----------------------------------------------------------------------------------- data
def _ec_files(sub: str, n: int) -> list:
    d = require_shared("ec_dimer") / sub
    return sorted(glob.glob(str(d / "*.xsf")))[:n]


def _read(files) -> list:
    from distmlip.data.readers import read_xsf

    return [s for f in files for s in read_xsf(f)]


@pytest.fixture(scope="module")
def emt_files(tmp_path_factory):
    """Periodic EMT structures as XSF: rattled 4-atom Cu/Au cells, a 2x1x1 alloy supercell and a
    1-atom triclinic cell (short lattice vectors: an atom sees many images of itself)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.readers import write_xsf
    from distmlip.data.structure import Structure

    d = tmp_path_factory.mktemp("emt_xsf")
    structs = rattled_cu_au(6, seed=3)
    rng = np.random.default_rng(5)
    big = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    big.symbols[[1, 4, 6]] = "Au"
    big.rattle(0.1, seed=4)
    tri = bulk("Au", "fcc", a=4.0)                          # primitive fcc: 60-degree cell
    tri.set_cell(tri.cell[:] @ (np.eye(3) + rng.normal(0, 0.03, (3, 3))), scale_atoms=True)
    for a in (big, tri):
        a.calc = EMT()
        structs.append(Structure(numbers=a.numbers.copy(), positions=a.positions.copy(), cell=np.array(a.cell[:]),
                                 pbc=np.ones(3, bool), energy=float(a.get_potential_energy()),
                                 forces=a.get_forces().copy()))
    # a wire and a slab whose non-periodic cell vectors are zero: write_xsf gives aenet (which
    # reads every PRIMVEC cell as periodic) vacuum vectors; predict.x crashed on the zeros
    for pbc, n in (((True, False, False), 4), ((True, True, False), 6)):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))[:n]
        a.symbols[0] = "Au"
        a.rattle(0.08, seed=n)
        cell = np.array(a.cell[:])
        cell[~np.array(pbc)] = 0.0
        a.set_cell(cell)
        a.pbc = pbc
        a.calc = EMT()
        structs.append(Structure(numbers=a.numbers.copy(), positions=a.positions.copy(), cell=cell,
                                 pbc=np.array(pbc), energy=float(a.get_potential_energy()),
                                 forces=a.get_forces().copy()))
    files = []
    for k, s in enumerate(structs):
        files.append(str(d / f"emt_{k:02d}.xsf"))
        write_xsf(files[-1], s)
    return files


def _energies_forces(model, structs):
    from distmlip.descriptors.batch import collate

    b = collate(structs, species=model.species, cutoff=model.cutoff, dtype=torch.float64)
    b.positions.requires_grad_(True)
    E, F = model.energy_and_forces(b)
    F = F.detach().numpy()
    off = np.concatenate([[0], np.cumsum(b.natoms.numpy())])
    return E.detach().numpy(), [F[off[k]:off[k + 1]] for k in range(len(structs))]


def _model(species, desc, hidden, acts, dtype, train, seed=0, ref=None):
    """A model normalised on ``train`` (as distmlip train does) with random weights."""
    from distmlip.descriptors.batch import collate
    from distmlip.models.bpnn import BPNN

    torch.manual_seed(seed)
    m = BPNN(species, desc, hidden, acts, dtype, reference_energies=ref)
    m.fit_normalization([collate(train, species=species, cutoff=m.cutoff)])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.4)
    return m


def _stats(model, structs):
    """The training-set record distmlip train writes into model files."""
    from ase.data import chemical_symbols

    ref = model.ann.reference_energies()
    epa = np.array([(s.energy - sum(ref.get(chemical_symbols[z], 0.0) for z in s.numbers)) / len(s.numbers)
                    for s in structs])
    return {"n_structures": len(structs), "n_atoms": int(sum(len(s.numbers) for s in structs)),
            "e_min": float(epa.min()), "e_max": float(epa.max()), "e_avg": float(epa.mean()),
            "species_atoms": {chemical_symbols[z]: int(c) for z, c in
                              zip(*np.unique(np.concatenate([s.numbers for s in structs]), return_counts=True))}}


# ----------------------------------------------------------------------------------- generate.x
def test_generate_x_features_equal_the_descriptor(tmp_path, emt_files):
    AP.require_aenet("generate.x", "trnset2ASCII.x")
    from distmlip._ext import has_kernel
    from distmlip.descriptors.batch import collate
    from distmlip.descriptors.chebyshev import ChebyshevDescriptor

    cases = [(_ec_files("train", 40), ["H", "C", "O"], EC_DESC), (_ec_files("train", 12), ["O", "C", "H"], EC_DESC),
             (emt_files, ["Cu", "Au"], EMT_DESC)]
    worst = 0.0
    for k, (files, species, desc) in enumerate(cases):
        ts = AP.generate(tmp_path / f"g{k}", files, species, {}, desc)
        theirs = AP.raw_features(tmp_path / f"g{k}", ts)
        structs = _read(files)
        assert len(theirs) == len(structs)
        d = ChebyshevDescriptor(species, desc["rc_radial"], desc["n_radial"], desc["rc_angular"], desc["n_angular"])
        b = collate(structs, species=species, cutoff=d.cutoff, dtype=torch.float64)
        G_aenet = np.concatenate(theirs)
        assert G_aenet.shape == (b.positions.shape[0], d.dim)
        kernels = ["reference"] + (["fused"] if has_kernel("chebyshev_forward", "cpu") else [])
        for kern in kernels:
            G = d(b.positions, b.species, b.pair_i, b.pair_j, b.pair_shift, pair_ptr=getattr(b, "pair_ptr", None),
                  kernels=kern).detach().numpy()
            err = np.abs(G - G_aenet) / np.maximum(np.abs(G_aenet), 1.0)
            worst = max(worst, float(err.max()))
            assert err.max() < 1e-10, (k, kern, float(err.max()))
    print(f"generate.x vs distmlip descriptor: max relative difference {worst:.2e}")


# ----------------------------------------------------------------------------------- export -> predict.x
EXPORT_CASES = [
    ("ec", ["H", "C", "O"], [10, 10], "tanh", "float64"),
    ("ec", ["O", "H", "C"], [8, 6], "sigmoid", "float64"),
    ("ec", ["C", "O", "H"], [6], "linear", "float64"),
    ("ec", ["H", "C", "O"], [10, 8, 6], ["tanh", "sigmoid", "tanh"], "float32"),
    ("ec", ["H", "O", "C"], [8, 8], ["mtanh", "twist"], "float64"),
    ("emt", ["Cu", "Au"], [8, 8], "tanh", "float64"),
    ("emt", ["Au", "Cu"], [6, 6, 6], ["sigmoid", "linear", "tanh"], "float32"),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda c: f"{c[0]}-{'-'.join(c[1])}-{c[3]}-{c[4]}")
def test_export_as_written_gives_predict_x_the_model(tmp_path, emt_files, case):
    AP.require_aenet("predict.x")
    from distmlip.cli import main

    kind, species, hidden, acts, dtype = case
    if kind == "ec":
        train = _read(_ec_files("train", 40))
        test_files = _ec_files("test", 50)
        desc, ref = EC_DESC, EC_REF
    else:
        train = _read(emt_files)
        test_files = emt_files
        desc, ref = EMT_DESC, {"Cu": -0.3}
    m = _model(species, desc, hidden, acts, dtype, train, ref=ref)
    mp = tmp_path / "model.pt"
    m.save(mp, metadata={"training_set": _stats(m, train)})
    assert main(["export", "--format", "aenet", str(mp), "-o", str(tmp_path / "nn")]) == 0
    files = {p.name.split(".")[0]: p for p in (tmp_path / "nn").glob("*.nn")}
    assert sorted(files) == sorted(species)
    order = sorted(species)                                   # predict.x's TYPES in another order
    E_aenet, F_aenet = AP.predict(tmp_path / "predict", {el: files[el] for el in order}, test_files)
    E, F = _energies_forces(m, _read(test_files))
    assert len(E_aenet) == len(E) == len(test_files)
    dE = np.abs(E_aenet - E).max()
    dF = max(np.abs(a - b).max() for a, b in zip(F_aenet, F))
    print(f"{case}: predict.x vs distmlip max |dE| {dE:.2e} eV, max |dF| {dF:.2e} eV/A")
    assert dE < 1e-7, dE
    assert dF < 1e-5, dF
    assert np.abs(np.concatenate(F)).max() > 1e-2          # forces that are not trivially zero


def test_ascii_export_reads_back_equal_to_the_binary(tmp_path):
    from distmlip.evaluation import aenet_nn
    from distmlip.evaluation.export_aenet import write_aenet

    train = _read(_ec_files("train", 10))
    m = _model(["H", "C", "O"], EC_DESC, [5, 4], ["twist", "sigmoid"], "float64", train, ref=EC_REF)
    bins = write_aenet(m, tmp_path / "b", stats=_stats(m, train))
    txts = write_aenet(m, tmp_path / "a", ascii=True, stats=_stats(m, train))
    for pb, pa in zip(bins, txts):
        a, b = aenet_nn.read_potential(pa), aenet_nn.read_potential(pb)
        assert (a.layout, b.layout) == ("ascii", "binary")
        np.testing.assert_array_equal(a.network.W, b.network.W)
        assert a.network.nnodes == b.network.nnodes and a.network.f_a == b.network.f_a == [4, 2, 0]
        np.testing.assert_array_equal(a.setup.sfval_cov, b.setup.sfval_cov)
        assert a.trainset.scale == b.trainset.scale and a.trainset.nstrucs == b.trainset.nstrucs == 10
        assert aenet_nn.to_binary(a) == pb.read_bytes()     # ASCII -> binary reproduces the bytes
        np.testing.assert_allclose([b.trainset.e_min, b.trainset.e_max], [-1.0, 1.0], rtol=1e-12)
        assert b.setup.neval == {"H": 80, "C": 60, "O": 60}[b.element]


# ----------------------------------------------------------------------------------- train.x -> import
def test_train_x_potential_imported_restarted_and_retrained(tmp_path):
    AP.require_aenet("generate.x", "train.x", "predict.x")
    from distmlip.cli import main
    from distmlip.evaluation import aenet_nn
    from distmlip.evaluation.export_aenet import write_aenet
    from distmlip.models.bpnn import BPNN

    species = ["H", "C", "O"]
    train_files = _ec_files("train", 40)
    test_files = _ec_files("test", 50)
    ts = AP.generate(tmp_path / "aenet", train_files, species, EC_REF, EC_DESC, output="ec.train")
    (tmp_path / "aenet" / "train.in").write_text(
        "TRAININGSET ec.train\nTESTPERCENT 10\nITERATIONS 8\n\nMETHOD\nbfgs\n\nNETWORKS\n"
        + "".join(f"  {el} {el}.nn 2 6:tanh 6:tanh\n" for el in species))
    AP.run("train.x", "train.in", tmp_path / "aenet")
    nn = {el: tmp_path / "aenet" / f"{el}.nn" for el in species}
    # import: the model predicts what predict.x predicts
    assert main(["import-aenet", *map(str, nn.values()), "-o", str(tmp_path / "imported.pt")]) == 0
    m = BPNN.load(tmp_path / "imported.pt")
    assert m.species == species and m.ann.hidden == [6, 6] and m.ann.reference_energies() == EC_REF
    E_aenet, F_aenet = AP.predict(tmp_path / "p1", nn, test_files)
    E, F = _energies_forces(m, _read(test_files))
    dE = np.abs(E_aenet - E).max()
    dF = max(np.abs(a - b).max() for a, b in zip(F_aenet, F))
    print(f"train.x potential imported: max |dE| {dE:.2e} eV, max |dF| {dF:.2e} eV/A vs predict.x")
    assert dE < 1e-7 and dF < 1e-5, (dE, dF)
    # the imported normalisation is generate.x's statistics, equal to distmlip's on the same structures
    fit = BPNN(species, EC_DESC, [6, 6], reference_energies=EC_REF)
    from distmlip.descriptors.batch import collate

    fit.fit_normalization([collate(_read(train_files), species=species, cutoff=fit.cutoff)])
    dmean = float((fit.ann.feature_mean - m.ann.feature_mean).abs().max())
    dstd = float(((fit.ann.feature_std - m.ann.feature_std) / fit.ann.feature_std).abs().max())
    print(f"feature normalisation generate.x vs distmlip: mean {dmean:.1e}, std (relative) {dstd:.1e}")
    assert dmean < 1e-12 and dstd < 1e-11, (dmean, dstd)
    # exported again: a train.x restart on the same training set starts at the model's errors
    rs = tmp_path / "restart"
    rs.mkdir()
    shutil.copyfile(ts, rs / "ec.train")
    write_aenet(m, rs, prefix="x")
    re_pot = aenet_nn.read_potential(rs / "C.x.nn")
    orig = aenet_nn.read_potential(nn["C"])
    assert re_pot.trainset.nstrucs == orig.trainset.nstrucs == 40 and re_pot.setup.neval == orig.setup.neval
    np.testing.assert_allclose([re_pot.trainset.scale, re_pot.trainset.shift],
                               [orig.trainset.scale, orig.trainset.shift], rtol=1e-12)
    train_in = (tmp_path / "aenet" / "train.in").read_text().replace("ITERATIONS 8", "ITERATIONS 1")
    (rs / "train.in").write_text(train_in.replace(".nn ", ".x.nn ").replace("TESTPERCENT 10", "TESTPERCENT 0"))
    out = AP.run("train.x", "train.in", rs)
    first = [ln.split() for ln in out.splitlines() if ln.strip().startswith("0 ")][0]
    structs = _read(train_files)
    E, _ = _energies_forces(m, structs)
    n = np.array([len(s.numbers) for s in structs])
    rmse = float(np.sqrt(np.mean(((E - np.array([s.energy for s in structs])) / n) ** 2)))
    print(f"train.x restart: epoch-0 training RMSE {float(first[2]):.6e} eV/atom, distmlip {rmse:.6e}")
    assert abs(float(first[2]) - rmse) <= 2e-6 * rmse + 1e-9, (first, rmse)
    # retrain under mpirun -n 2 from the imported model, export, predict.x agrees again
    h5 = tmp_path / "ec.h5"
    distmlip_cli(["convert", str(require_shared("ec_dimer") / "train"), "-o", str(h5)])
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(f"""
data: {{train: [{h5}], fractions: [0.9, 0.1, 0.0]}}
descriptor: {{rc_radial: 6.5, n_radial: 12, rc_angular: 4.0, n_angular: 4}}
training: {{mode: energy, epochs: 2, lr: 1.0e-3, warm_start: {tmp_path / 'imported.pt'}, output: {tmp_path / 'run'},
           progress_bar: 'off'}}
""")
    res = mpirun(2, ["-m", "distmlip", "train", str(cfg)], timeout=600)
    assert "warm start from" in res.stdout, res.stdout[-2000:]
    retrained = BPNN.load(tmp_path / "run" / "model.pt")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(retrained.parameters(), m.parameters()))
    assert moved > 1e-6
    assert retrained.metadata["training_set"]["n_structures"] > 200
    assert main(["export", "--format", "aenet", str(tmp_path / "run" / "model.pt"), "-o", str(tmp_path / "nn2")]) == 0
    files = {p.name.split(".")[0]: p for p in (tmp_path / "nn2").glob("*.nn")}
    E_aenet, F_aenet = AP.predict(tmp_path / "p2", files, test_files[:20])
    E, F = _energies_forces(retrained, _read(test_files[:20]))
    dE = np.abs(E_aenet - E).max()
    dF = max(np.abs(a - b).max() for a, b in zip(F_aenet, F))
    print(f"retrained under mpirun -n 2 and exported: max |dE| {dE:.2e} eV, max |dF| {dF:.2e} eV/A vs predict.x")
    assert dE < 1e-7 and dF < 1e-5, (dE, dF)

