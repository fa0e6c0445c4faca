"""ZBL inside the full model: forces = -dE/dR by finite differences through the ASE calculator,
E_model - E_model(no ZBL) equals the independent ZBL loop, a dimer's energy rises steeply at short
distance, the term survives save/load, and the normalisation is fitted on E_ref - E_ZBL."""
import numpy as np
import pytest
import torch
from ase import Atoms

from distmlip.errors import ConfigError
from distmlip.evaluation.calculator import DistmlipCalculator
from distmlip.models.bpnn import BPNN
from distmlip.models.zbl import zbl_energy_reference

DESC = {"rc_radial": 3.5, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2, "backend": "reference"}


def _pair(zbl, seed=0):
    torch.manual_seed(seed)
    m = BPNN(["Cu", "Au"], DESC, [6], "tanh", zbl=zbl)
    for p in m.parameters():
        p.data.normal_(0.0, 0.3)
    return m


def test_model_with_zbl_energy_and_fd_forces(tmp_path):
    m0, m1 = _pair(None), _pair({"radii": {"Cu-Au": [0.9, 1.9]}})
    m1.load_state_dict({**m0.state_dict(), **{k: v for k, v in m1.state_dict().items() if k.startswith("zbl.")}})
    path = tmp_path / "m.pt"
    m1.save(path)
    m1 = BPNN.load(path)                       # the ZBL term and its radii survive save/load
    assert m1.zbl is not None and float(m1.zbl.r_out[0, 1]) == 1.9 and m1.cutoff >= 3.5
    rng = np.random.default_rng(2)
    atoms = Atoms("Cu3Au2", positions=rng.uniform(0, 2.2, (5, 3)))
    e = {}
    for name, m in (("ann", m0), ("hyb", m1)):
        a = atoms.copy()
        a.calc = DistmlipCalculator(m)
        e[name] = a.get_potential_energy()
    def radii(zi, zj):
        return (0.9, 1.9) if {zi, zj} == {29, 79} else _default(zi, zj)

    ref = zbl_energy_reference(atoms.positions.tolist(), atoms.numbers, radii=radii)
    assert ref > 1.0
    np.testing.assert_allclose(e["hyb"] - e["ann"], ref, rtol=1e-10)
    # forces of the hybrid = -dE/dR by central differences through the calculator
    a = atoms.copy()
    a.calc = DistmlipCalculator(m1)
    F = a.get_forces()
    h = 1e-5
    fd = np.zeros_like(F)
    for i in range(len(a)):
        for k in range(3):
            for sgn in (1, -1):
                b = atoms.copy()
                b.positions[i, k] += sgn * h
                b.calc = DistmlipCalculator(m1)
                fd[i, k] -= sgn * b.get_potential_energy() / (2 * h)
    np.testing.assert_allclose(F, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def _default(zi, zj):
    from distmlip.models.zbl import default_radii

    return default_radii(zi, zj)


def test_dimer_energy_rises_steeply_with_zbl():
    m0, m1 = _pair(None, 1), _pair({}, 1)
    m1.load_state_dict({**m0.state_dict(), **{k: v for k, v in m1.state_dict().items() if k.startswith("zbl.")}})
    rs = [0.4, 0.6, 0.8, 1.0, 1.2]
    E = {}
    for name, m in (("ann", m0), ("hyb", m1)):
        calc = DistmlipCalculator(m)
        E[name] = []
        for r in rs:
            a = Atoms("Cu2", positions=[[0, 0, 0], [r, 0, 0]])
            a.calc = calc
            E[name].append(a.get_potential_energy())
    hyb = np.array(E["hyb"])
    assert np.all(np.diff(hyb) < 0)                  # monotonically repulsive inwards
    assert hyb[0] - hyb[-1] > 100.0                  # hundreds of eV between 1.2 A and 0.4 A (Z = 29)
    assert abs(np.ptp(E["ann"])) < 10.0              # the bare network has no such wall


def test_zbl_config_errors_and_residual_fit():
    with pytest.raises(ConfigError, match="zbl"):
        BPNN(["Cu"], DESC, [4], zbl={"radii": {"Cu-Xx": [0.5, 1.0]}})
    with pytest.raises(ConfigError, match="inner < outer"):
        BPNN(["Cu"], DESC, [4], zbl={"radii": {"Cu-Cu": [1.0, 0.5]}})
    # normalisation: the energy shift is fitted on E_ref - E_ZBL
    from distmlip.data.structure import Structure
    from distmlip.descriptors.batch import collate

    structs = []
    for r in (0.7, 0.8, 0.9):
        pos = np.array([[0.0, 0, 0], [r, 0, 0]])
        e_zbl = zbl_energy_reference(pos.tolist(), [29, 29])
        structs.append(Structure(numbers=np.array([29, 29]), positions=pos, cell=np.zeros((3, 3)),
                                 pbc=np.zeros(3, bool), energy=e_zbl - 4.0))   # residual: -2 eV/atom
    m = BPNN(["Cu"], DESC, [4], zbl={})
    m.fit_normalization([collate(structs, m.species, m.cutoff)], descriptor=True, energy="mean", scale=False)
    np.testing.assert_allclose(float(m.ann.energy_shift[0]), -2.0, atol=1e-10)


def _cache_off_and_on(tmp_path, h5, radii: str) -> dict:
    """Two energy-mode Trainers (not fitted) on ``h5`` with ZBL ``radii`` (YAML text), descriptor
    cache off and on, otherwise identical."""
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    trainers = {}
    for cache in ("off", "on"):
        y = tmp_path / f"{cache}.yaml"
        y.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 3.5, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: {cache}}}
model: {{hidden: [6]}}
training: {{mode: energy, epochs: 3, batch_atoms: 16, lr: 0.01, output: {tmp_path / cache}, progress_bar: 'off'}}
zbl: {{enabled: true, radii: {radii}}}
""")
        trainers[cache] = Trainer(load_train_config(y), quiet=True)
    return trainers


def test_energy_training_with_zbl_uses_the_cache_and_equals_without(tmp_path):
    """ZBL energies are constants of each structure in energy training: with the descriptor cache
    they come from the structures of the cached batch (once per structure), and training equals
    training on positions (radii wide enough that ZBL acts on every structure here)."""
    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import H5Dataset, write_dataset
    from distmlip.descriptors.batch import collate

    h5 = tmp_path / "d" / "emt.h5"
    h5.parent.mkdir()
    write_dataset(h5, rattled_cu_au(16))
    ds = H5Dataset(h5)
    m = _pair({"radii": {"Cu-Cu": [1.5, 2.6], "Au-Cu": [1.5, 2.6], "Au-Au": [1.5, 2.6]}})
    s = ds.read([3, 0, 5])
    b = collate(s, m.species, cutoff=m.cutoff, dtype=torch.float64)
    e_pos = m.zbl.atomic_energies(b)
    assert float(e_pos.abs().sum()) > 0.1
    torch.testing.assert_close(m.zbl.frozen_atomic_energies(s), e_pos, rtol=0, atol=1e-13)
    assert len(m.zbl._frozen) == 3
    m.zbl.frozen_atomic_energies(ds.read([0]))          # seen before: no new entry
    assert len(m.zbl._frozen) == 3
    trainers = _cache_off_and_on(tmp_path, h5, "{Cu-Cu: [1.5, 2.6], Au-Cu: [1.5, 2.6], Au-Au: [1.5, 2.6]}")
    for t in trainers.values():
        t.fit()
    assert trainers["off"].cache is None and trainers["on"].cache is not None
    a, b = trainers["off"].model.state_dict(), trainers["on"].model.state_dict()
    d = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert d < 1e-10, d


def test_short_pairs_of_prepared_structures_give_the_same_zbl():
    """Training batches carry the pairs inside ZBL's outer radius of their element pair, found
    once per structure (prepare(short_range=...)): the ZBL energies and forces from those equal a scan of
    every pair, on a periodic triclinic cell with close pairs across the boundary and a molecule
    without any; the short pairs are exactly the pairs closer than the radius."""
    from ase.build import bulk

    from distmlip.descriptors.batch import collate_graphs, prepare, species_table

    m = _pair({})
    zbl = m.zbl
    rng = np.random.default_rng(5)
    a = bulk("Cu", "fcc", a=3.0).repeat((2, 2, 2))             # compressed: pairs near 2.1 A
    a.set_cell(a.cell[:] @ np.array([[1, 0.1, 0], [0, 1, 0.05], [0, 0, 1]]), scale_atoms=True)
    a.symbols[[1, 5]] = "Au"
    a.positions += rng.normal(0, 0.25, a.positions.shape)
    far = Atoms("CuAu", positions=[[0, 0, 0], [0, 0, 2.6]])
    table = species_table(m.species)
    graphs = [prepare(s, table, m.cutoff, short_range=zbl.short_range) for s in (a, far)]
    b = collate_graphs(graphs)
    d = (b.positions[b.pair_j] - b.positions[b.pair_i] + b.pair_shift).norm(dim=1)
    r_out = torch.as_tensor(zbl.short_range)[b.species[b.pair_i], b.species[b.pair_j]]
    assert sorted(b.short_pairs.tolist()) == torch.nonzero(d < r_out).squeeze(1).tolist()
    assert b.short_pairs.numel() > 0 and graphs[1].short_pairs.size == 0
    b.positions.requires_grad_(True)
    E1, F1 = zbl.energy_and_forces(b)
    b.short_pairs = None
    E0, F0 = zbl.energy_and_forces(b)
    assert float(E0.abs().max()) > 0.0
    assert torch.equal(E0, E1) and torch.equal(F0, F1)


def test_default_radii_stay_off_the_training_data(tmp_path, capsys):
    """Default outer radii above 0.9 x the shortest distance of an element pair in the training
    data are lowered to it (inner radius scaled with it), the user's radii are kept, pairs the
    data never bring close keep the defaults; the trainer logs each change, and ZBL then gives
    no energy on any training structure."""
    from ase import Atoms

    from distmlip.data.h5store import write_dataset
    from distmlip.data.structure import Structure
    from distmlip.models.zbl import default_radii, radii_for_data
    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    lo, hi = default_radii(6, 8)                     # C-O: 0.71 / 1.07 A
    radii, lowered = radii_for_data(["C", "O", "Cu"], {"Cu-Cu": [1.0, 1.5]},
                                    {"C-O": 0.84, "C-Cu": 3.0, "Cu-Cu": 1.2, "O-O": None})
    assert radii["C-O"] == pytest.approx([lo * 0.756 / hi, 0.756]) and radii["Cu-Cu"] == [1.0, 1.5]
    assert "C-Cu" not in radii and [x[0] for x in lowered] == ["C-O"]
    rng = np.random.default_rng(0)
    structs = []
    for k in range(12):                              # CO molecules stretched and squeezed (0.85-1.3 A)
        d = 0.85 + 0.45 * k / 11
        a = Atoms("COCu", positions=[[0, 0, 0], [0, 0, d], [0, 2.5 + rng.uniform(0, 0.3), 0]])
        structs.append(Structure(numbers=a.numbers, positions=a.positions, cell=np.zeros((3, 3)),
                                 pbc=np.zeros(3, bool), energy=float(5.0 * (d - 1.13) ** 2 - 3.0)))
    h5 = tmp_path / "co.h5"
    write_dataset(h5, structs)
    y = tmp_path / "t.yaml"
    y.write_text(f"""
data: {{train: [{h5}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 3, rc_angular: 3.0, n_angular: 2}}
model: {{hidden: [4]}}
training: {{mode: energy, epochs: 1, batch_atoms: 16, output: {tmp_path / 'run'}, progress_bar: 'off'}}
""")
    t = Trainer(load_train_config(y))
    out = capsys.readouterr()
    assert "zbl: C-O outer radius 1.065 -> 0.765 A (0.9 x the shortest C-O distance of the training data, " \
           "0.850 A)" in out.out + out.err
    m = t.model
    C, O = m.species.index("C"), m.species.index("O")
    assert float(m.zbl.r_out[C, O]) == pytest.approx(0.9 * 0.85, rel=1e-9)
    from distmlip.descriptors.batch import collate

    b = collate(structs, m.species, m.cutoff)
    assert float(m.zbl.atomic_energies(b).abs().max()) == 0.0
    assert m.training_record["pair_min_distance_A"]["C-O"] == pytest.approx(0.85)


def test_cached_energy_training_skips_zbl_only_where_no_pair_is_inside(tmp_path):
    """The cached-descriptor path takes zero ZBL energies without a pair list for the structures
    whose record-pass minima lie beyond every outer radius; radii set between the structures'
    shortest distances leave some structures inside: the loader's frozen energies must still
    equal ZBL's own for every structure, and training equal training on positions."""
    import numpy as np

    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import H5Dataset, write_dataset
    from distmlip.models.data_record import structure_pair_minima

    h5 = tmp_path / "d" / "emt.h5"
    h5.parent.mkdir()
    write_dataset(h5, rattled_cu_au(16))
    ds = H5Dataset(h5)
    shortest = [min(structure_pair_minima(s.numbers, s.positions, s.cell, s.pbc, 3.5).values())
                for s in ds.read(list(range(ds.n_structures)))]
    r = float(np.median(shortest)) + 1e-3
    # unequal radii per pair, so that a pair looked up in the wrong order would show
    radii = f"{{Cu-Cu: [1.0, {r}], Au-Cu: [1.0, {r - 0.04}], Au-Au: [1.0, {r + 0.04}]}}"
    trainers = _cache_off_and_on(tmp_path, h5, radii)
    t = trainers["on"]
    mine = np.asarray(t.stream.partition())
    clear = t._zbl_clear[mine]
    assert clear.any() and not clear.all(), clear
    loader, zbl = t.stream.loader, t.model.zbl
    for i in mine:
        want = zbl.frozen_atomic_energies(ds.read([int(i)]), memo=False).numpy()
        np.testing.assert_allclose(loader._frozen_energy(np.array([i])), want, rtol=0, atol=1e-14)
        if t._zbl_clear[i]:
            assert not want.any()
    inside = [i for i in mine if not t._zbl_clear[i]]
    assert any(zbl.frozen_atomic_energies(ds.read([int(i)]), memo=False).abs().sum() > 0 for i in inside)
    # the positions path's prepared structures take their short pairs as none where the record
    # shows them clear: the same short pairs as measuring every pair
    from distmlip.descriptors.batch import prepare, species_table

    off = trainers["off"]
    assert off.graphs is not None and off.graphs.short_clear is not None
    table = species_table(off.model.species)
    for i, g in zip(mine, off.graphs.graphs(mine)):
        ref = prepare(ds.read([int(i)])[0], table, off.model.cutoff, short_range=off.model.zbl.short_range)
        np.testing.assert_array_equal(g.short_pairs, ref.short_pairs)
    for t in trainers.values():
        t.fit()
    a, b = trainers["off"].model.state_dict(), trainers["on"].model.state_dict()
    d = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert d < 1e-10, d
