"""distmlip convert / info: readers, validation, subsets, MPI, atomic output."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from helpers import distmlip_cli, mpirun, require_shared
from distmlip.data.convert import ConvertConfig, convert
from distmlip.data.examples import emt_structures
from distmlip.data.h5store import H5Dataset
from distmlip.data.readers import read_xsf, write_xsf
from distmlip.errors import InputError


def _cfg(inputs, out, **kw):
    return ConvertConfig(inputs=[str(i) for i in inputs], output=str(out), **kw)


@pytest.fixture(scope="module")
def emt():
    return emt_structures(16, seed=11)


@pytest.fixture(scope="module")
def xsf_dir(tmp_path_factory, emt):
    d = tmp_path_factory.mktemp("xsf")
    for k, s in enumerate(emt):
        sub = d / ("train" if k % 4 else "test")
        sub.mkdir(exist_ok=True)
        write_xsf(sub / f"s{k:03d}.xsf", s)
    return d


def test_xsf_writer_reader_exact(tmp_path, emt):
    for k, s in enumerate(emt[:8]):
        p = tmp_path / f"{k}.xsf"
        write_xsf(p, s)
        r = read_xsf(p)[0]
        assert r.energy == s.energy  # shortest repr: exact round trip of float64
        assert np.array_equal(r.forces, s.forces)
        assert np.array_equal(r.positions, s.positions)
        assert np.array_equal(r.pbc, s.pbc) and np.array_equal(r.numbers, s.numbers)
        if s.pbc.any():
            # a non-periodic axis keeps its direction, with at least 20 A of vacuum for aenet
            per = np.asarray(s.pbc)
            np.testing.assert_allclose(r.cell[per], s.cell[per], atol=1e-14)
            for d in np.flatnonzero(~per):
                np.testing.assert_allclose(np.cross(r.cell[d], s.cell[d]), 0.0, atol=1e-9)
    # forces absent, free molecule
    p = tmp_path / "m.xsf"
    p.write_text("# total energy = -1.25 eV\n\nATOMS\nH 0 0 0\nH 0 0 0.74\n")
    r = read_xsf(p)[0]
    assert r.energy == -1.25 and r.forces is None and not r.pbc.any() and r.natoms == 2


def test_xsf_primvec_without_keyword_is_periodic(tmp_path):
    """A PRIMVEC block without CRYSTAL/SLAB/POLYMER is a crystal to aenet (xsflib.f90: PRIMVEC
    sets pbc); it was read as a free molecule, so a 1-atom fcc cell lost all its images (sweep 18)."""
    body = "PRIMVEC\n0 1.8 1.8\n1.8 0 1.8\n1.8 1.8 0\nPRIMCOORD\n1 1\nCu 0 0 0 0 0 0\n"
    (tmp_path / "bare.xsf").write_text("# total energy = -1 eV\n" + body)
    (tmp_path / "crystal.xsf").write_text("# total energy = -1 eV\nCRYSTAL\n" + body)
    (tmp_path / "slab.xsf").write_text("# total energy = -1 eV\nSLAB\n" + body)
    bare, crystal, slab = (read_xsf(tmp_path / f"{n}.xsf")[0] for n in ("bare", "crystal", "slab"))
    assert bare.pbc.all() and np.array_equal(bare.cell, crystal.cell) and np.array_equal(bare.pbc, crystal.pbc)
    assert slab.pbc.tolist() == [True, True, False]        # a keyword still says what it says
    convert(_cfg([tmp_path / "bare.xsf"], tmp_path / "d.h5"))
    assert H5Dataset(tmp_path / "d.h5")[0].pbc.all()


def test_xsf_of_a_slab_gives_aenet_20_A_of_vacuum_whatever_its_cell(tmp_path):
    """aenet reads every PRIMVEC cell as periodic in all three directions.  A slab whose
    non-periodic vector left 2 A between the atoms and their image was written as it was, and
    predict.x let the slab interact with its image; a skewed vacuum vector counts by its height.
    Now every non-periodic axis gets at least 20 A of vacuum along the normal of the periodic
    plane, in its own direction; atoms, periodic vectors and a long enough vector are kept."""
    from ase.build import fcc100

    from distmlip.data.structure import Structure

    a = fcc100("Cu", (2, 2, 3), vacuum=1.0)           # 2 A between the top layer and the image
    for third in (a.cell[2], a.cell[2] + [1.0, 0.5, 0.0], a.cell[2] * 30):
        cell = np.array(a.cell)
        cell[2] = third
        s = Structure(a.numbers.copy(), a.positions.copy(), cell, np.array([True, True, False]), energy=-1.0)
        write_xsf(tmp_path / "s.xsf", s)
        back = read_xsf(tmp_path / "s.xsf")[0]
        np.testing.assert_array_equal(back.positions, s.positions)
        np.testing.assert_array_equal(back.cell[:2], s.cell[:2])
        n = np.cross(cell[0], cell[1])
        n /= np.linalg.norm(n)
        extent = np.ptp(s.positions @ n)
        assert back.cell[2] @ n >= extent + 20.0 - 1e-9
        np.testing.assert_allclose(np.cross(back.cell[2], third), 0.0, atol=1e-9)       # same direction
        if third @ n >= extent + 20.0:
            np.testing.assert_array_equal(back.cell[2], third)


def test_convert_round_trip_values_equal_files(tmp_path, xsf_dir, emt):
    out = tmp_path / "d.h5"
    convert(_cfg([xsf_dir], out, reference_energies={"Cu": -0.1, "Al": -0.2, "Ni": -0.3, "Pd": -0.4,
                                                      "Ag": -0.5, "Pt": -0.6, "Au": -0.7}))
    ds = H5Dataset(out)
    assert len(ds) == len(emt)
    by_name = {os.path.basename(s.source): s for s in ds.read(range(len(ds)))}
    for k, s in enumerate(emt):
        g = by_name[f"s{k:03d}.xsf"]
        parsed = read_xsf(g.source)[0]  # independent read of the file
        assert g.energy == parsed.energy
        assert np.array_equal(g.forces, parsed.forces)
        assert np.array_equal(g.positions, parsed.positions)
        np.testing.assert_allclose(g.forces, s.forces, atol=1e-15)
        assert g.energy == pytest.approx(s.energy, abs=1e-14)
        assert g.has_forces and not g.synthetic and g.weight == 1.0 and g.parent == -1
    assert ds.reference_energies["Cu"] == -0.1
    info = distmlip_cli(["info", str(out)]).stdout
    assert f"structures    : {len(emt)}" in info and "mean |F|" in info and "subsets" in info


def test_extxyz_and_db_inputs(tmp_path, emt):
    import ase.io
    from ase.db import connect

    atoms = [s.to_ase() for s in emt[:6]]
    ase.io.write(tmp_path / "a.extxyz", atoms, format="extxyz")
    with connect(tmp_path / "b.db") as db:
        for a in atoms:
            db.write(a)
    out = tmp_path / "d.h5"
    convert(_cfg([tmp_path / "a.extxyz", tmp_path / "b.db"], out, keep_duplicates=True))   # the same frames twice
    ds = H5Dataset(out)
    assert len(ds) == 12
    got = ds.read(range(12))
    for k in range(12):
        s = emt[k % 6]
        assert got[k].source_index == k % 6
        assert got[k].energy == pytest.approx(s.energy, rel=1e-9, abs=1e-9)  # extxyz text precision
        np.testing.assert_allclose(got[k].forces, s.forces, atol=1e-7)
        np.testing.assert_allclose(got[k].positions, s.positions, atol=1e-7)


def test_subsets_auto_directory_pattern(tmp_path, xsf_dir, emt):
    out = tmp_path / "a.h5"
    convert(_cfg([xsf_dir], out))
    ds = H5Dataset(out)
    keys = {tuple(s.numbers) for s in emt}
    assert len(ds.subsets) == len(keys)
    for i, s in enumerate(ds.read(range(len(ds)))):
        assert tuple(ds.subsets[ds.subset_ids[i]]["order"]) == tuple(s.numbers)
    convert(_cfg([xsf_dir], out, subset_by="directory"))
    assert sorted(t["name"] for t in H5Dataset(out).subsets) == ["test", "train"]
    convert(_cfg([xsf_dir], out, subset_by="pattern", subset_pattern=r"s0*(\d)\d\.xsf"))
    names = {t["name"] for t in H5Dataset(out).subsets}
    assert names == {"0", "1"}
    # explicit split from the directory layout is stored
    convert(_cfg([xsf_dir], out, split_by_pattern={"train": "train/", "test": "test/"}))
    ds = H5Dataset(out)
    sp = ds.column("split")
    src = ds.column("source")
    assert all((v == 0) == ("/train/" in s) for v, s in zip(sp, src)) and (sp == 2).sum() == 4


BAD = {
    "nan_energy": ("# total energy = nan eV\n\nATOMS\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\n", "energy"),
    "missing_energy": ("ATOMS\nH 0 0 0\nH 0 0 1\n", "energy"),
    "inf_force": ("# total energy = -1 eV\nATOMS\nH 0 0 0 inf 0 0\nH 0 0 1 0 0 0\n", "forces"),
    "nan_position": ("# total energy = -1 eV\nATOMS\nH 0 nan 0\nH 0 0 1\n", "positions"),
    "close_atoms": ("# total energy = -1 eV\nATOMS\nH 0 0 0\nH 0 0 0.3\n", "closer than"),
    "close_image": ("# total energy = -1 eV\nCRYSTAL\nPRIMVEC\n0.4 0 0\n0 5 0\n0 0 5\nPRIMCOORD\n1 1\nH 0 0 0\n",
                    "periodic image"),
    "zero_volume": ("# total energy = -1 eV\nCRYSTAL\nPRIMVEC\n1 0 0\n2 0 0\n0 0 5\nPRIMCOORD\n1 1\nH 0 0 0\n",
                    "zero volume"),
    "unknown_element": ("# total energy = -1 eV\nATOMS\nXx 0 0 0\n", "unknown element"),
    "empty": ("", "empty file"),
    "malformed": ("# total energy = -1 eV\nATOMS\nH 0 0\n", "columns"),
    "bad_number": ("# total energy = -1 eV\nATOMS\nH 0 0 zero\n", "cannot parse"),
    "short_primcoord": ("# total energy = -1 eV\nCRYSTAL\nPRIMVEC\n5 0 0\n0 5 0\n0 0 5\nPRIMCOORD\n3 1\nH 0 0 0\n",
                        "announces 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_errors(tmp_path, case, xsf_dir):
    text, needle = BAD[case]
    bad = tmp_path / f"{case}.xsf"
    bad.write_text(text)
    out = tmp_path / "d.h5"
    with pytest.raises(InputError) as ei:
        convert(_cfg([xsf_dir / "train", bad], out))
    msg = str(ei.value)
    assert f"{case}.xsf" in msg and needle in msg, msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_missing_forces_allowed(tmp_path):
    p = tmp_path / "m.xsf"
    p.write_text("# total energy = -1.5 eV\nATOMS\nH 0 0 0\nH 0 0 0.74\n")
    convert(_cfg([p], tmp_path / "d.h5"))
    s = H5Dataset(tmp_path / "d.h5")[0]
    assert s.forces is None and s.energy == -1.5


def test_skip_invalid_report_and_cli(tmp_path, xsf_dir):
    for case in ("nan_energy", "close_atoms", "zero_volume"):
        (tmp_path / f"{case}.xsf").write_text(BAD[case][0])
    out = tmp_path / "o" / "d.h5"
    res = distmlip_cli(["convert", str(xsf_dir / "train"), str(tmp_path / "*.xsf"), "-o", str(out), "--skip-invalid"])
    assert "3 rejected" in res.stdout
    ds = H5Dataset(out)
    assert len(ds) == len(os.listdir(xsf_dir / "train"))
    rep = json.loads((tmp_path / "o" / "d.h5.rejected.json").read_text())
    assert sorted(os.path.basename(r["source"]) for r in rep["rejected"]) == \
        ["close_atoms.xsf", "nan_energy.xsf", "zero_volume.xsf"]
    txt = (tmp_path / "o" / "d.h5.rejected.txt").read_text()
    assert "field 'energy'" in txt and "field 'cell'" in txt
    # without --skip-invalid the CLI stops with a one-line error naming file, structure, field
    res = distmlip_cli(["convert", str(tmp_path / "*.xsf"), "-o", str(tmp_path / "e.h5")], check=False)
    assert res.returncode == 2 and "structure 0" in res.stderr and "field '" in res.stderr
    assert not (tmp_path / "e.h5").exists()


def test_failed_conversion_keeps_existing_output(tmp_path, xsf_dir):
    out = tmp_path / "d.h5"
    convert(_cfg([xsf_dir / "test"], out))
    before = out.read_bytes()
    (tmp_path / "bad.xsf").write_text(BAD["nan_position"][0])
    with pytest.raises(InputError):
        convert(_cfg([xsf_dir / "train", tmp_path / "bad.xsf"], out))
    assert out.read_bytes() == before


def test_config_file_and_errors(tmp_path, xsf_dir, capsys):
    from distmlip.cli import main

    cfg = tmp_path / "c.yaml"
    out = tmp_path / "d.h5"
    cfg.write_text(f"inputs: ['{xsf_dir}']\noutput: {out}\nmin_distance: 0.4\nsubset_by: directory\n"
                   "reference_energies: {Cu: -1.0, Al: -1, Ni: -1, Pd: -1, Ag: -1, Pt: -1, Au: -1}\n")
    assert main(["convert", "--config", str(cfg)]) == 0
    ds = H5Dataset(out)
    assert len(ds.subsets) == 2 and ds.reference_energies["Cu"] == -1.0
    cfg.write_text(f"inputs: ['{xsf_dir}']\noutput: {out}\nmin_distanse: 0.4\n")
    capsys.readouterr()
    assert main(["convert", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "min_distanse" in err and "min_distance" in err
    assert main(["convert", str(xsf_dir), "-o", str(out), "--reference-energies", "Cu=-1"]) == 2
    assert "missing for element" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing*.xsf"), "-o", str(out)]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert main(["convert", str(xsf_dir), "-o", str(out), "--reference-energies", "Qq=-1"]) == 2
    assert "unknown element symbol 'Qq'" in capsys.readouterr().err


def _arrays(path):
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                v = obj[...]
                out[name] = list(v) if v.dtype == object else (v.dtype.str, v.shape, v.tobytes())
        f.visititems(visit)
        attrs = {k: f.attrs[k] for k in ("species", "units", "reference_energies", "n_atoms", "n_structures")}
    return out, attrs


def test_mpi_two_ranks_identical(tmp_path, xsf_dir):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    args = [str(xsf_dir), "--split-by-pattern", "train=train/,test=test/", "--subset-by", "auto"]
    distmlip_cli(["convert"] + args + ["-o", str(one)])
    res = mpirun(2, ["-m", "distmlip", "convert"] + args + ["-o", str(two)])
    assert "on 2 rank(s)" in res.stdout
    assert _arrays(one) == _arrays(two)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "shards left behind"


def test_mpi_two_ranks_ase_formats(tmp_path, emt):
    """ASE-read inputs (extxyz) split over ranks: each rank reads its own files (ASE's default
    parallel reading would broadcast from rank 0 and deadlock)."""
    import ase.io

    for k in range(3):
        ase.io.write(tmp_path / f"f{k}.extxyz", [s.to_ase() for s in emt[4 * k:4 * k + 4]], format="extxyz")
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    distmlip_cli(["convert", str(tmp_path / "*.extxyz"), "-o", str(one)])
    mpirun(2, ["-m", "distmlip", "convert", str(tmp_path / "*.extxyz"), "-o", str(two)], timeout=120)
    assert _arrays(one) == _arrays(two)
    assert len(H5Dataset(two)) == 12


def test_mpi_error_on_one_rank_ends_job(tmp_path, xsf_dir):
    bad = tmp_path / "zz_bad.xsf"   # sorts last: only the last rank sees it
    bad.write_text(BAD["nan_energy"][0])
    out = tmp_path / "d.h5"
    res = mpirun(2, ["-m", "distmlip", "convert", str(xsf_dir / "train"), str(bad), "-o", str(out)],
                 check=False, timeout=120)
    assert res.returncode != 0
    assert "zz_bad.xsf" in res.stderr and "field 'energy'" in res.stderr
    assert not out.exists()


def test_ec_dimer_files(tmp_path):
    d = require_shared("ec_dimer")
    files = sorted((d / "train").glob("*.xsf"))[:5] + sorted((d / "test").glob("*.xsf"))[:5]
    out = tmp_path / "ec.h5"
    convert(_cfg(files, out, split_by_pattern={"train": "train/", "test": "test/"}))
    ds = H5Dataset(out)
    assert len(ds) == 10 and ds.species == ["H", "C", "O"]
    for s in ds.read(range(10)):
        lines = open(s.source).read().splitlines()
        assert s.energy == float(lines[0].split("=")[1].split()[0])
        rows = [ln.split() for ln in lines if len(ln.split()) == 7]
        assert np.array_equal(s.forces, np.array([[float(x) for x in r[4:7]] for r in rows]))
        assert np.array_equal(s.positions, np.array([[float(x) for x in r[1:4]] for r in rows]))
    assert list(ds.column("split")) == [0] * 5 + [2] * 5


def _mixed_extxyz(path, n=30, bad_frame=17):
    """One multi-frame extxyz: bulk cells, alloys, slabs and free clusters (several
    compositions, atom counts and orders), with a frame of two atoms 0.1 A apart at
    ``bad_frame`` (rejected under --skip-invalid)."""
    import ase.io

    structs = emt_structures(n, seed=5)
    atoms = [s.to_ase() for s in structs]
    bad = atoms[bad_frame].copy()
    bad.calc = atoms[bad_frame].calc
    bad.positions[1] = bad.positions[0] + [0.1, 0, 0]
    atoms[bad_frame] = bad
    ase.io.write(path, atoms, format="extxyz")
    return structs


def _fields(path):
    ds = H5Dataset(path)
    cols = {k: ds.column(k) for k in ("energy", "natoms", "subset", "source_index", "has_forces", "weight",
                                      "cell", "pbc")}
    at = {k: np.concatenate([b for _, _, b in ds.iter_atom_blocks(k)]) for k in ("numbers", "positions", "forces")}
    return ds, cols, at


def test_one_file_split_over_1_2_3_ranks_identical(tmp_path):
    """The frames of ONE extxyz file are shared out over the ranks (each parses its own byte
    range); the data set, its subsets and the reject report equal the 1-rank conversion."""
    src = tmp_path / "all.extxyz"
    structs = _mixed_extxyz(src)
    outs = {}
    convert(_cfg([src], tmp_path / "r1.h5", skip_invalid=True))
    outs[1] = tmp_path / "r1.h5"
    for n in (2, 3):
        outs[n] = tmp_path / f"r{n}.h5"
        res = mpirun(n, ["-m", "distmlip", "convert", str(src), "-o", str(outs[n]), "--skip-invalid"], timeout=300)
        # rank 0 parsed only its share of the one file
        share = int(res.stdout.split("rank 0: read ")[-1].split("/")[1].split()[0])
        assert 0 < share < 30, res.stdout
        assert f"on {n} rank(s)" in res.stdout and "1 rejected" in res.stdout
    ds1, cols1, at1 = _fields(outs[1])
    assert len(ds1) == 29 and 17 not in set(cols1["source_index"])
    assert list(cols1["source_index"]) == [k for k in range(30) if k != 17]
    # values are those of the input frames (extxyz text precision)
    for k, s in zip(cols1["source_index"], ds1.read(range(len(ds1)))):
        np.testing.assert_allclose(s.positions, structs[k].positions, atol=1e-7)
        assert s.energy == pytest.approx(structs[k].energy, abs=1e-7)
    assert len(ds1.subsets) > 5
    rep1 = json.loads((tmp_path / "r1.h5.rejected.json").read_text())["rejected"]
    assert [r["structure"] for r in rep1] == [17]
    for n in (2, 3):
        ds, cols, at = _fields(outs[n])
        assert ds.content_id == ds1.content_id
        for k in cols1:
            assert np.array_equal(cols[k], cols1[k]), (n, k)
        for k in at1:
            assert np.array_equal(at[k], at1[k]), (n, k)
        assert [(t["name"], t["natoms"]) for t in ds.subsets] == [(t["name"], t["natoms"]) for t in ds1.subsets]
        assert _arrays(outs[n])[0] == _arrays(outs[1])[0]
        assert json.loads((tmp_path / f"r{n}.h5.rejected.json").read_text())["rejected"] == rep1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "shards left behind"


def test_bad_frame_in_large_file_named(tmp_path):
    """A malformed frame deep inside one file: the error names the file and the frame."""
    src = tmp_path / "all.extxyz"
    _mixed_extxyz(src, n=12, bad_frame=3)
    lines = src.read_text().splitlines(keepends=True)
    # frame 9: corrupt the x coordinate of its first atom
    from distmlip.data.frames import scan_extxyz

    offs = scan_extxyz(src)
    text = src.read_bytes()
    head_end = text.index(b"\n", text.index(b"\n", offs[9]) + 1)
    row_end = text.index(b"\n", head_end + 1)
    row = text[head_end + 1:row_end].split()
    row[1] = b"zz"
    src.write_bytes(text[:head_end + 1] + b" ".join(row) + text[row_end:])
    del lines
    with pytest.raises(InputError) as ei:
        convert(_cfg([src], tmp_path / "d.h5", skip_invalid=True))
    assert "all.extxyz: frame 9: cannot read" in str(ei.value)
    assert not (tmp_path / "d.h5").exists()


def test_label_keys_of_published_extxyz(tmp_path, emt):
    """Data sets written for other codes keep their labels under keys such as REF_energy,
    REF_forces and REF_stress, with per-configuration weights beside them.  Without
    --energy-key / --forces-key such frames used to be rejected as 'missing energy' (and their
    forces would have been dropped silently): convert names the key to pass; with the keys the
    values arrive exactly; weight keys never count as labels."""
    from ase.io import write

    frames = []
    assert any(s.pbc.any() for s in emt[:5]) and not all(s.pbc.any() for s in emt[:5])
    for k, s in enumerate(emt[:5]):
        a = s.to_ase()
        a.calc = None
        a.info["REF_energy"] = s.energy + 0.125
        a.arrays["REF_forces"] = s.forces * 2.0
        if a.pbc.any():
            a.info["REF_stress"] = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006]) * (k + 1)
        a.info["config_energy_weight"] = 1.0
        a.info["config_stress_weight"] = 0.5
        frames.append(a)
    write(tmp_path / "ref.extxyz", frames)
    with pytest.raises(InputError, match="field 'energy'.*pass --energy-key REF_energy"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5"))
    with pytest.raises(InputError, match="field 'forces'.*pass --forces-key REF_forces"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5", energy_key="REF_energy"))
    with pytest.raises(InputError, match="field 'stress'.*pass --stress-key REF_stress"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5", energy_key="REF_energy", forces_key="REF_forces"))
    # a typo in a given key: the labels sit under another key of the frame (they were dropped
    # from every frame with exit 0)
    with pytest.raises(InputError, match="field 'forces': no key 'REF_force' .*a typo in --forces-key"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5", energy_key="REF_energy", forces_key="REF_force",
                     stress_key="REF_stress"))
    with pytest.raises(InputError, match="field 'stress': no key 'REF_stres' .*pass --stress-key REF_stress"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5", energy_key="REF_energy", forces_key="REF_forces",
                     stress_key="REF_stres"))
    assert not (tmp_path / "a.h5").exists()
    with pytest.raises(InputError, match="structure 0: field 'energy': no key 'dft_energy'"):
        convert(_cfg([tmp_path / "ref.extxyz"], tmp_path / "a.h5", energy_key="dft_energy"))
    r = distmlip_cli(["convert", str(tmp_path / "ref.extxyz"), "-o", str(tmp_path / "a.h5"), "--energy-key",
                      "REF_energy", "--forces-key", "REF_forces", "--stress-key", "REF_stress"])
    assert r.returncode == 0, r.stderr
    S = H5Dataset(tmp_path / "a.h5").read(np.arange(5))
    for k, (s, ref) in enumerate(zip(S, emt[:5])):
        assert s.energy == ref.energy + 0.125
        # extxyz writes per-atom columns with 8 decimals
        np.testing.assert_allclose(s.forces, ref.forces * 2.0, rtol=0, atol=1e-8)
        if not ref.pbc.any():       # no stress key in this frame: stored without stress
            assert not s.has_stress
            continue
        v = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006]) * (k + 1)
        np.testing.assert_allclose(s.stress, [[v[0], v[5], v[4]], [v[5], v[1], v[3]], [v[4], v[3], v[2]]], rtol=0,
                                   atol=1e-15)
    # plain labels beside weight keys: no false alarm
    plain = []
    for s in emt[:3]:
        a = s.to_ase()
        a.info["config_energy_weight"] = 1.0
        a.info["config_stress_weight"] = 0.0
        a.arrays["forces_weight"] = np.ones(len(a))
        plain.append(a)
    write(tmp_path / "plain.extxyz", plain)
    convert(_cfg([tmp_path / "plain.extxyz"], tmp_path / "p.h5"))
    assert H5Dataset(tmp_path / "p.h5").n_structures == 3


def test_model_predictions_beside_labels_are_not_guessed_and_a_virial_key_is_a_virial(tmp_path):
    """A file evaluated by a model carries its predictions beside the DFT labels (MACE_energy and
    REF_energy): the hint named the alphabetically first key (the model's) and following it trained
    on predictions.  A virial key passed as --stress-key was stored as a stress (V times too
    large, sign flipped)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    frames, true = [], []
    for k in range(3):
        a = bulk("Cu", "fcc", a=3.59, cubic=True) * (2, 1, 1)
        a.rattle(0.02, seed=k)
        a.calc = EMT()
        e, f, st = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
        b = a.copy()
        b.calc = None
        b.info.update(REF_energy=e, MACE_energy=e + 0.1)
        b.arrays["REF_forces"], b.arrays["MACE_forces"] = f, f * 0.9
        b.info["REF_virial"] = (-st * a.get_volume()).reshape(-1)
        frames.append(b)
        true.append(st)
    write(tmp_path / "m.extxyz", frames)
    with pytest.raises(InputError, match="several keys fit, so convert does not guess") as e:
        convert(_cfg([tmp_path / "m.extxyz"], tmp_path / "a.h5"))
    assert "pass --energy-key MACE_energy" not in str(e.value)
    with pytest.raises(InputError, match="pass --forces-key REF_forces"):     # the given key's prefix
        convert(_cfg([tmp_path / "m.extxyz"], tmp_path / "a.h5", energy_key="REF_energy"))
    with pytest.raises(InputError, match="pass --stress-key REF_virial .*read as a virial"):
        convert(_cfg([tmp_path / "m.extxyz"], tmp_path / "a.h5", energy_key="REF_energy", forces_key="REF_forces"))
    convert(_cfg([tmp_path / "m.extxyz"], tmp_path / "a.h5", energy_key="REF_energy", forces_key="REF_forces",
                 stress_key="REF_virial"))
    for s, st in zip(H5Dataset(tmp_path / "a.h5").read(np.arange(3)), true):
        np.testing.assert_allclose(s.stress, st, rtol=1e-6, atol=1e-9)


def test_free_energy_only_frames_are_said(tmp_path, capsys):
    """Frames whose results hold only 'free_energy' (no 'energy') are stored with it, and convert
    says so once per file instead of choosing silently."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for k in range(3):
        a = bulk("Cu", "fcc", a=3.6).repeat(2)
        a.rattle(0.01, seed=k)
        a.calc = SinglePointCalculator(a, free_energy=-1.0 - k, forces=np.zeros((8, 3)))
        frames.append(a)
    write(str(tmp_path / "fe.extxyz"), frames)
    convert(ConvertConfig(inputs=[str(tmp_path / "fe.extxyz")], output=str(tmp_path / "fe.h5")))
    err = capsys.readouterr().err
    assert err.count("only 'free_energy'") == 1 and "fe.extxyz" in err
    S = H5Dataset(tmp_path / "fe.h5").read(range(3))
    assert sorted(s.energy for s in S) == [-3.0, -2.0, -1.0]


def test_fixed_atoms_in_the_input_are_said(tmp_path, capsys):
    """Frames with FixAtoms (extxyz move_mask) are converted with their raw forces, and convert
    says once per file which atoms are fixed and how augment can keep them in place."""
    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.io import write

    frames = []
    for k in range(2):
        a = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        a.rattle(0.02, seed=k)
        a.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
        a.calc = EMT()
        a.get_forces()
        frames.append(a)
    write(str(tmp_path / "fx.extxyz"), frames)
    convert(ConvertConfig(inputs=[str(tmp_path / "fx.extxyz")], output=str(tmp_path / "fx.h5")))
    err = capsys.readouterr().err
    assert err.count("4 of the 12 atoms (Cu12) are fixed") == 1
    assert "fixed_atoms: [0, 1, 2, 3]" in err          # the whole list, ready to paste
    s = H5Dataset(tmp_path / "fx.h5").read([0])[0]
    assert np.abs(s.forces[:4]).max() > 0.01          # the raw forces, not the constrained zeros


def test_two_converts_on_one_output_file(tmp_path, capsys):
    """A second convert to an output file that a live job is writing is refused, naming the file
    and the job; another file in the same folder is free; a dead job's lock is taken over."""
    import json as _json
    import socket
    import subprocess

    from distmlip.cli import main as cli_main
    from distmlip.data.readers import write_xsf

    src = tmp_path / "in"
    src.mkdir()
    for k, s in enumerate(emt_structures(3, seed=1, max_size=2)):
        write_xsf(src / f"s{k}.xsf", s)
    other = subprocess.Popen(["sleep", "60"])
    try:
        host = socket.gethostname().split(".")[0].replace(".", "_") or "host"
        (tmp_path / ".same.h5.distmlip.lock").write_text(_json.dumps({"host": host, "pid": other.pid}))
        capsys.readouterr()
        assert cli_main(["convert", str(src), "-o", str(tmp_path / "same.h5")]) == 2
        err = capsys.readouterr().err
        assert f"output file {tmp_path / 'same.h5'} is in use by another job" in err and str(other.pid) in err
        assert not (tmp_path / "same.h5").exists()
        assert cli_main(["convert", str(src), "-o", str(tmp_path / "other.h5")]) == 0
    finally:
        other.kill()
        other.wait()
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "same.h5")]) == 0      # dead holder: taken over
    assert not (tmp_path / ".same.h5.distmlip.lock").exists()


def test_a_folder_reads_labelled_files_only_and_says_what_it_skips(tmp_path, emt, capsys):
    """A VASP run folder failed on CONTCAR ('missing energy'); its OUTCAR and vasprun.xml were
    both read (every step twice, copies in training and validation); a stray metadata.json
    stopped the conversion; a SLURM log named *.out must not be taken for a QE output."""
    from ase.io import write

    from distmlip.data.readers import _vasp_pairs

    d = tmp_path / "runs"
    (d / "r1").mkdir(parents=True)
    write(d / "r1" / "data.extxyz", [s.to_ase() for s in emt[:4]])
    write(d / "r1" / "POSCAR", emt[0].to_ase(), format="vasp")
    write(d / "r1" / "CONTCAR", emt[0].to_ase(), format="vasp")
    (d / "r1" / "metadata.json").write_text('{"code": "vasp"}')
    (d / "r1" / "slurm-17.out").write_text("job started\n")
    convert(_cfg([d], tmp_path / "a.h5"))
    err = capsys.readouterr().err
    assert H5Dataset(tmp_path / "a.h5").n_structures == 4
    assert "structure only (no energies) (CONTCAR, POSCAR)" in err and "slurm-17.out" in err
    assert "metadata.json" in err
    kept, dropped = _vasp_pairs(["a/OUTCAR", "a/vasprun.xml", "b/OUTCAR", "c/relax.OUTCAR", "c/relax_vasprun.xml"])
    assert kept == ["a/vasprun.xml", "b/OUTCAR", "c/relax_vasprun.xml"]
    assert dropped == ["a/OUTCAR", "c/relax.OUTCAR"]


def test_a_folder_follows_linked_folders_once_and_names_broken_links(tmp_path, emt, capsys):
    """A data tree that links in another folder of calculations (ln -s ../groupB/runs runs/b):
    Path.rglob did not follow the link, and its structures were left out without a word
    (sweep 20: 12 of 18 structures converted, exit 0).  Linked folders are read (each real
    folder once: a link to an ancestor is no loop) and a broken link is named."""
    from ase.io import write

    d, other = tmp_path / "runs", tmp_path / "groupB"
    (d / "a").mkdir(parents=True)
    other.mkdir()
    write(d / "a" / "data.extxyz", [s.to_ase() for s in emt[:4]])
    write(other / "more.extxyz", [s.to_ase() for s in emt[4:10]])
    (d / "a" / "b").symlink_to(other, target_is_directory=True)
    (d / "a" / "up").symlink_to(d, target_is_directory=True)          # a loop
    (d / "gone.extxyz").symlink_to(tmp_path / "nowhere.extxyz")
    convert(_cfg([d], tmp_path / "a.h5"))
    assert H5Dataset(tmp_path / "a.h5").n_structures == 10
    assert "broken symbolic link (gone.extxyz)" in capsys.readouterr().err


def test_repeated_structures_are_dropped_listed_and_the_same_on_two_ranks(tmp_path, emt, capsys):
    """The same frame twice (two files of one run, a file read twice, frames printed with fewer
    digits) sat in training and validation alike; it is dropped and listed; the same geometry
    with another energy is kept and warned about; --keep-duplicates keeps all; 1 and 2 ranks
    write the same data set."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = [s.to_ase() for s in emt[:6]]
    again = [a.copy() for a in frames[1:4]]
    for a, s in zip(again, emt[1:4]):          # reprinted with fewer digits (an OUTCAR beside vasprun.xml)
        a.positions = np.round(a.positions, 5)
        a.calc = SinglePointCalculator(a, energy=round(s.energy, 6), forces=np.round(s.forces, 5))
    other = frames[5].copy()
    other.calc = SinglePointCalculator(other, energy=emt[5].energy + 0.5, forces=emt[5].forces)
    write(tmp_path / "a.extxyz", frames)
    write(tmp_path / "b.extxyz", again + [other])
    ins = [tmp_path / "a.extxyz", tmp_path / "b.extxyz"]
    r = convert(_cfg(ins, tmp_path / "one.h5"))
    err = capsys.readouterr().err
    assert r["duplicates"] == 3 and r["structures"] == 7, r
    assert "3 structure(s) repeat an earlier one and were dropped" in err
    assert "1 structure(s) repeat an earlier geometry with another energy (kept)" in err
    ds = H5Dataset(tmp_path / "one.h5")
    assert ds.n_structures == 7 and sum(t["count"] for t in ds.subsets) == 7
    got = ds.read(np.arange(7))
    assert [s.source_index for s in got] == [0, 1, 2, 3, 4, 5, 3]      # b.extxyz keeps its frame 3 only
    report = (tmp_path / "one.h5.rejected.txt").read_text()
    assert report.count("duplicate of") == 3 and "b.extxyz: structure 0" in report
    kept = convert(_cfg(ins, tmp_path / "all.h5", keep_duplicates=True))
    assert kept["structures"] == 10 and kept["duplicates"] == 0
    two = mpirun(2, ["-m", "distmlip", "convert", str(ins[0]), str(ins[1]), "-o", str(tmp_path / "two.h5")])
    assert two.returncode == 0
    with h5py.File(tmp_path / "one.h5") as f1, h5py.File(tmp_path / "two.h5") as f2:
        assert f1.attrs["content_sha256"] == f2.attrs["content_sha256"]


def test_ase_db_labels_in_key_value_pairs_and_data(tmp_path, emt):
    """DFT databases keep labels as a row's key-value pairs and data (`ase db` shows them), which
    ase.io.read drops: --energy-key dft_energy said the key was not in the frame."""
    import ase.db

    with ase.db.connect(tmp_path / "l.db") as db:
        for s in emt[:3]:
            a = s.to_ase()
            a.calc = None
            db.write(a, dft_energy=s.energy - 1.0, data={"dft_forces": s.forces * 0.5})
    with pytest.raises(InputError, match="pass --energy-key dft_energy"):
        convert(_cfg([tmp_path / "l.db"], tmp_path / "l.h5"))
    convert(_cfg([tmp_path / "l.db"], tmp_path / "l.h5", energy_key="dft_energy", forces_key="dft_forces"))
    for got, s in zip(H5Dataset(tmp_path / "l.h5").read(np.arange(3)), emt[:3]):
        assert got.energy == pytest.approx(s.energy - 1.0, abs=1e-12)
        np.testing.assert_allclose(got.forces, s.forces * 0.5, atol=1e-12)


def test_a_molecule_with_a_stress_keeps_its_energy_and_forces(tmp_path, emt, capsys):
    """Plane-wave codes report a stress for a molecule in its box; such a frame (pbc all False)
    was rejected whole, and --skip-invalid discarded its valid energy and forces."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    mol = [s for s in emt if not s.pbc.any()][0]
    a = mol.to_ase()
    a.calc = SinglePointCalculator(a, energy=mol.energy, forces=mol.forces, stress=np.full(6, 0.01))
    write(tmp_path / "m.extxyz", [a])
    convert(_cfg([tmp_path / "m.extxyz"], tmp_path / "m.h5"))
    assert "is not stored (its energy and forces are" in capsys.readouterr().err
    got = H5Dataset(tmp_path / "m.h5")[0]
    assert not got.has_stress and got.energy == pytest.approx(mol.energy) and got.forces is not None


def test_charge_and_spin_states_are_said(tmp_path, emt, capsys):
    from ase.io import write

    frames = []
    for q, s in zip((0, 1), emt[:2]):
        a = s.to_ase()
        a.info["charge"] = q
        frames.append(a)
    write(tmp_path / "q.extxyz", frames)
    convert(_cfg([tmp_path / "q.extxyz"], tmp_path / "q.h5"))
    err = capsys.readouterr().err
    assert err.count("does not keep charge or spin") == 1 and "charge=" in err
