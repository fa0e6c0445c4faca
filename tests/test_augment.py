"""distmlip augment: sampler, Taylor labels, GPR labels vs EMT, output data set, 1 vs 2 MPI ranks,
rerun after a crash, config errors.  Real HDF5 files and real mpirun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import emt_structure, mpirun

from distmlip.cli import main as cli_main

from distmlip.data.h5store import H5Dataset, write_dataset
from distmlip.gpr.sampling import displace, min_distance, subset_rng, taylor_energy


def _rattled(make, n, amp, seed0, source):
    """n EMT-labelled copies of make(), rattled by amp with seeds seed0, seed0 + 1, ..."""
    out = []
    for k in range(n):
        a = make()
        a.rattle(amp, seed=seed0 + k)
        out.append(emt_structure(a, source, k))
    return out


def _al_cells():
    from ase.build import bulk

    return _rattled(lambda: bulk("Al", "fcc", a=4.05).repeat((2, 1, 1)), 4, 0.05, 20, "al")


def _emt_dataset(path):
    from ase import Atoms
    from ase.build import bulk

    out = _rattled(lambda: bulk("Cu", "fcc", a=3.6, cubic=True), 6, 0.05, 0, "cu_bulk")
    out += _rattled(lambda: Atoms("Cu3Ni", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]]),
                    5, 0.08, 10, "cluster")
    out += _al_cells()
    write_dataset(path, out)
    return out


def _cfg(tmp_path, name, **extra):
    import yaml

    d = {"input": str(tmp_path / "in.h5"), "output": str(tmp_path / f"{name}.h5"), "copies": 4,
         "delta": 0.03, "seed": 3, "gpr": {"fit_max_obs": 120, "fit_iterations": 15}}
    d.update(extra)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


class _Res:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def run_cli(capsys, args, check=True):
    """The distmlip CLI in this process (no torch import per call)."""
    capsys.readouterr()
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    if check:
        assert rc == 0, err
    return _Res(rc, out, err)


def _arrays(path):
    ds = H5Dataset(path)
    S = ds.read(np.arange(ds.n_structures))
    return ds, S


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aug")
    _emt_dataset(tmp / "in.h5")
    return tmp


# ------------------------------------------------------------------------------ sampler
def test_displacements_seeded_no_translation_min_distance():
    pos = np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.2, 0], [0.4, 0.4, 1.1]])
    a = displace(pos, 50, 0.1, subset_rng(7, "X"), min_dist=0.8)
    b = displace(pos, 50, 0.1, subset_rng(7, "X"), min_dist=0.8)
    c = displace(pos, 50, 0.1, subset_rng(7, "Y"), min_dist=0.8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a.mean(1), 0.0, atol=1e-14)            # no net translation
    assert all(min_distance(pos + d) >= 0.8 for d in a)                 # guard held
    # the guard really resamples: without it some draws would violate the bound
    free = subset_rng(7, "X").normal(0, 0.1, size=(50, 4, 3))
    free -= free.mean(1, keepdims=True)
    assert any(min_distance(pos + d) < 0.8 for d in free)
    assert 0.07 < a.std() < 0.13
    # fixed atoms stay put
    f = displace(pos, 5, 0.1, subset_rng(1, "X"), fixed=[0, 2], min_dist=0.5)
    assert np.all(f[:, [0, 2]] == 0) and np.all(f[:, [1, 3]] != 0)
    from distmlip.errors import InputError
    with pytest.raises(InputError, match="min_distance"):
        displace(pos, 1, 0.1, subset_rng(1, "X"), min_dist=1.05)
    with pytest.raises(InputError, match="no displaced copy"):
        displace(pos, 20, 1e-3, subset_rng(1, "X"), min_dist=1.0, max_tries=3)


def _displace_checking_every_pair(pos, n_copies, delta, rng, cell, pbc, min_dist):
    """The guard as first written: every copy's minimum distance over all pairs and images."""
    out = np.zeros((n_copies, len(pos), 3))
    for m in range(n_copies):
        while True:
            d = rng.normal(0.0, delta, size=pos.shape)
            d -= d.mean(0)
            if min_distance(pos + d, cell, pbc, cutoff=min_dist * 1.01) >= min_dist:
                out[m] = d
                break
    return out


@pytest.mark.parametrize("delta", [0.05, 0.25])
def test_displacement_guard_on_close_pairs_equals_the_all_pairs_guard(delta):
    """The guard checks the parent's close pairs only (and every pair when a copy moved an atom by
    half the margin or more, which delta 0.25 A reaches): the copies must be those of the check over
    all pairs and periodic images, draw for draw, in a skewed periodic cell shorter than the
    cutoff along one axis, in a slab and in a molecule, each with pairs near the bound."""
    rng = np.random.default_rng(3)
    cell = np.array([[2.6, 0.0, 0.0], [1.1, 4.0, 0.0], [0.3, 0.4, 5.0]])
    grid = np.array([[i, j, k] for i in (0, 0.5) for j in (0, 0.5) for k in (0, 0.5)])
    pos = (grid + rng.uniform(-0.01, 0.01, size=grid.shape)) @ cell
    pos = np.vstack([pos, pos[0] + [0.0, 0.0, 0.95]])                  # a pair near the bound
    cases = [(cell, [True, True, True]), (cell, [True, True, False]), (None, None)]
    rejected = 0
    for c, pbc in cases:
        p0 = pos
        assert 0.9 < min_distance(p0, c, pbc, cutoff=1.01) < 1.0
        a = displace(p0, 40, delta, subset_rng(5, "Z"), cell=c, pbc=pbc, min_dist=0.9)
        b = _displace_checking_every_pair(p0, 40, delta, subset_rng(5, "Z"), c, pbc, 0.9)
        np.testing.assert_array_equal(a, b)
        free = subset_rng(5, "Z").normal(0, delta, size=(40,) + p0.shape)
        free -= free.mean(1, keepdims=True)
        rejected += sum(min_distance(p0 + d, c, pbc, cutoff=1.01) < 0.9 for d in free)
    assert rejected > 0          # the bound was really in play


def test_taylor_energy_formula():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(3, 3))
    d = rng.normal(size=(4, 3, 3))
    np.testing.assert_allclose(taylor_energy(-2.0, F, d), [-2.0 - np.sum(F * x) for x in d], rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ CLI, 1 rank
def test_augment_gpr_output_labels_and_report(data, capsys):
    cfg = _cfg(data, "gpr1", max_uncertainty=0.02, subsets={"Al2_0": {"copies": 3, "delta": 0.02}})
    res = run_cli(capsys, ["augment", str(cfg)])
    assert "Cu4_0" in res.stdout and "copies kept" in res.stdout
    ds_in, S_in = _arrays(data / "in.h5")
    ds, S = _arrays(data / "gpr1.h5")
    rep = json.loads((data / "gpr1.report.json").read_text())
    n_syn = sum(r["n_kept"] for r in rep["subsets"])
    n_all = sum(r["n_copies"] for r in rep["subsets"])
    assert n_all == 6 * 4 + 5 * 4 + 4 * 3
    assert ds.n_structures == ds_in.n_structures + n_syn == rep["n_output"]
    syn = np.array([s.synthetic for s in S])
    assert not syn[:ds_in.n_structures].any() and syn[ds_in.n_structures:].all()
    # originals unchanged, copies carry parent, uncertainty <= threshold, weight, subset
    for a, b in zip(S_in, S[:ds_in.n_structures]):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.energy == b.energy
    from ase.calculators.emt import EMT
    errs, base = [], []
    for s in S[ds_in.n_structures:]:
        p = S[s.parent]
        assert s.subset == p.subset and np.array_equal(s.numbers, p.numbers)
        assert 0 <= s.uncertainty <= 0.02 and not s.has_forces and s.source == p.source
        a = s.to_ase(); a.calc = EMT()
        errs.append(abs(a.get_potential_energy() - s.energy))
        base.append(abs(a.get_potential_energy() - p.energy))
    # GPR labels much closer to the exact EMT energies of the copies than the parent energies
    assert np.mean(errs) < 0.6 * np.mean(base), (np.mean(errs), np.mean(base))
    for r in rep["subsets"]:
        g = r["gpr"]
        assert g["weight"] > 0 and g["length_scale"] > 0 and g["jitter"] >= 0 and "time_fit_s" in g
        assert g["length_scale"] >= g["nn_distance"] * (1 - 1e-9) and g["fit_candidates"]
        # fingerprint auto: the local kernel against inverse distances on the free cluster (the
        # smaller leave-one-structure-out label-error estimate over all training structures kept:
        # E_MAE + delta sqrt(3 n) F_MAE); the local kernel alone on periodic cells
        if r["subset"] != "Cu3Ni_0":
            assert r["fingerprint"]["kind"] == "local" and r.get("fingerprint_choice") is None
            continue
        ch = r["fingerprint_choice"]
        assert set(ch) == {"local", "inverse"}
        assert r["fingerprint"]["kind"] == min(ch, key=ch.get)
        from ase.formula import Formula
        n = len(Formula(r["subset"].rsplit("_", 1)[0]))
        assert min(ch.values()) == pytest.approx(
            g["loo_all_energy_mae_eV"] + r["delta_A"] * np.sqrt(3 * n) * g["loo_all_force_mae_eVA"])
    # rejected copies are in the candidates file
    from ase.io import read
    n_c = rep["n_candidates"]
    if n_c:
        frames = read(str(data / "gpr1.candidates.xyz"), index=":")
        assert len(frames) == n_c and all(f.info["gpr_sigma"] > 0.02 for f in frames)
    assert (data / "gpr1.report.txt").read_text().startswith("subset")


def test_augment_taylor_labels_exact(data, capsys):
    cfg = _cfg(data, "taylor", method="taylor", copies=3, delta=0.01, synthetic_weight=0.5)
    run_cli(capsys, ["augment", str(cfg)])
    ds_in, _ = _arrays(data / "in.h5")
    ds, S = _arrays(data / "taylor.h5")
    assert ds.n_structures == ds_in.n_structures * 4
    for s in S[ds_in.n_structures:]:
        p = S[s.parent]
        d = s.positions - p.positions
        assert s.energy == pytest.approx(p.energy - np.sum(p.forces * d), abs=1e-12)
        assert s.weight == 0.5 and s.uncertainty == 0.0


def test_augment_prints_a_whole_phase_eta(data, capsys, monkeypatch):
    """Each subset's stages print their own ETAs; a rank's whole share of subsets had none (a
    multi-subset run on 256-atom cells gave no idea of the total, sweep 24).  After each unit, the
    elapsed time scaled by the remaining units' estimated cost."""
    import distmlip.gpr.augment as aug

    monkeypatch.setattr(aug, "ETA_AFTER_S", 0.0)
    res = run_cli(capsys, ["augment", str(_cfg(data, "eta", method="taylor", copies=2))])
    n = len(json.loads((data / "eta.report.json").read_text())["subsets"])
    lines = [x for x in res.stdout.splitlines() if "of this rank's units in this phase done" in x]
    assert n >= 3 and len(lines) == n - 1 and all("ETA ~" in x for x in lines), res.stdout
    assert lines[0].startswith(f"augment: 1/{n} ") and lines[-1].startswith(f"augment: {n - 1}/{n} ")


def test_augment_refuses_an_output_file_another_job_writes(data, capsys):
    """Two augment jobs with their own shard folders and one output file: the second is refused
    (both reported "wrote" the file before, which held the second's structures)."""
    import json
    import subprocess

    from distmlip.utils.io import _HOST

    holder = subprocess.Popen(["sleep", "60"])
    try:
        (data / ".busy.h5.distmlip.lock").write_text(json.dumps({"host": _HOST, "pid": holder.pid, "job": "",
                                                                  "started": "now"}))
        cfg = _cfg(data, "busy", method="taylor", copies=2, workdir=str(data / "own_shards"))
        res = run_cli(capsys, ["augment", str(cfg)], check=False)
        assert res.returncode == 2 and "output file" in res.stderr and "in use by another job" in res.stderr, res.stderr
        assert not (data / "busy.h5").exists() and not (data / "own_shards" / ".distmlip.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    res = run_cli(capsys, ["augment", str(cfg)])          # the holder is gone: taken over
    assert (data / "busy.h5").exists()


# ------------------------------------------------------------------------------ MPI, rerun
def test_two_ranks_identical_to_one_and_rerun_skips(data, capsys):
    cfg1 = _cfg(data, "r1")
    cfg2 = _cfg(data, "r2")
    run_cli(capsys, ["augment", str(cfg1)])
    res = mpirun(2, ["-m", "distmlip", "augment", str(cfg2)])
    assert "[rank 1]" in res.stdout and "[rank 0]" in res.stdout
    # three subsets, two ranks: each rank took the next untaken one (claims), every subset once,
    # and the run's claims are gone
    done = re.findall(r"\[rank (\d)\] subset (\S+) \((\d)/3\): \d+ reference, ", res.stdout)
    assert sorted(d[1] for d in done) == sorted(set(d[1] for d in done)) and len(done) == 3, res.stdout
    assert not list((data / "r2.h5.shards").glob("claims.*"))
    # the two ranks of this node split gpr.memory_fraction: a rank's kernel cap (rows ~ sqrt of
    # its memory) is 1/sqrt(2) of one process's (a rewrite of the loop once dropped the split)
    caps = [[s["gpr"]["memory_cap_obs"] for s in json.loads((data / f"{r}.report.json").read_text())["subsets"]
             if "gpr" in s] for r in ("r1", "r2")]
    assert caps[0] and np.median(caps[1]) < 0.8 * np.median(caps[0]), caps
    _, A = _arrays(data / "r1.h5")
    _, B = _arrays(data / "r2.h5")
    assert len(A) == len(B)
    for a, b in zip(A, B):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.energy, a.parent, a.uncertainty, a.subset, a.synthetic) == \
               (b.energy, b.parent, b.uncertainty, b.subset, b.synthetic)
    # crash recovery: remove one shard and the output; rerun recomputes only that subset
    shard = data / "r1.h5.shards" / "subset_00001.npz"
    shard.unlink()
    (data / "r1.h5").unlink()
    res = run_cli(capsys, ["augment", str(cfg1)])
    assert res.stdout.count("finished earlier, skipped") == 2
    assert "subset Cu3Ni_0 (" in res.stdout
    _, C = _arrays(data / "r1.h5")
    assert [c.energy for c in C] == [a.energy for a in A]


def test_rerun_after_an_edited_energy_recomputes_only_its_subset(data, capsys):
    """Shards are keyed by their subset's own structures: after one energy of the Al subset is
    corrected, a rerun recomputes that subset and reuses the two others (every subset was
    recomputed before: the key hashed the whole file), and its output equals a fresh run's."""
    structs = _emt_dataset(data / "ed_in.h5")
    cfg = _cfg(data, "ed", method="taylor", input=str(data / "ed_in.h5"))
    run_cli(capsys, ["augment", str(cfg)])
    al = [s for s in structs if s.source == "al"][-1]
    al.energy += 0.02
    write_dataset(data / "ed_in.h5", structs)
    res = run_cli(capsys, ["augment", str(cfg)])
    assert res.stdout.count("finished earlier, skipped") == 2, res.stdout
    fresh = _cfg(data, "ed_fresh", method="taylor", input=str(data / "ed_in.h5"))
    run_cli(capsys, ["augment", str(fresh)])
    _, A = _arrays(data / "ed.h5")
    _, B = _arrays(data / "ed_fresh.h5")
    assert len(A) == len(B) and any(a.energy == al.energy for a in A)
    for a, b in zip(A, B):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.energy, a.parent, a.subset) == (b.energy, b.parent, b.subset)


def test_rerun_after_new_subsets_appended_recomputes_only_those(data, capsys):
    """A data set that grew by structures of a new kind, appended at its end (same elements):
    a rerun reuses every earlier subset's shard, computes the new subset, and its output equals a
    fresh run's on the grown set."""
    from ase.build import bulk

    structs = _emt_dataset(data / "gr_in.h5")
    cfg = _cfg(data, "gr", method="taylor", input=str(data / "gr_in.h5"))
    first = run_cli(capsys, ["augment", str(cfg)])
    n_sub = first.stdout.count(" reference, ")
    assert n_sub >= 3, first.stdout
    grown = structs + _rattled(lambda: bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1)), 4, 0.05, 40, "cu8")
    write_dataset(data / "gr_in.h5", grown)
    res = run_cli(capsys, ["augment", str(cfg)])
    assert res.stdout.count("finished earlier, skipped") == n_sub, res.stdout
    fresh = _cfg(data, "gr_fresh", method="taylor", input=str(data / "gr_in.h5"))
    run_cli(capsys, ["augment", str(fresh)])
    _, A = _arrays(data / "gr.h5")
    _, B = _arrays(data / "gr_fresh.h5")
    assert len(A) == len(B) > len(structs) and sum(len(a.numbers) == 8 for a in A) > 4
    for a, b in zip(A, B):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.energy, a.parent, a.subset) == (b.energy, b.parent, b.subset)


def test_bad_config_errors(data, capsys):
    cfg = _cfg(data, "bad", copiez=3)
    res = run_cli(capsys, ["augment", str(cfg)], check=False)
    assert res.returncode == 2 and "copiez" in res.stderr and "did you mean 'copies'" in res.stderr
    cfg = _cfg(data, "bad2", subsets={"NoSuch": {"copies": 1}})
    res = run_cli(capsys, ["augment", str(cfg)], check=False)
    assert res.returncode == 2 and "NoSuch" in res.stderr and "Cu4_0" in res.stderr
    cfg = _cfg(data, "bad3", gpr={"lenght_scale": 1.0})
    res = run_cli(capsys, ["augment", str(cfg)], check=False)
    assert res.returncode == 2 and "lenght_scale" in res.stderr
    res = run_cli(capsys, ["augment", str(_cfg(data, "bad4")), "--set", "method=newton"], check=False)
    assert res.returncode == 2 and "newton" in res.stderr
    assert not (data / "bad.h5").exists()


def test_stored_split_keeps_test_structures_out_of_the_gpr(tmp_path, capsys):
    """With a stored split only training structures are GPR data and parents; validation/test
    structures pass through unchanged with their split."""
    structs = _emt_dataset(tmp_path / "all.h5")
    split = np.zeros(len(structs), dtype=np.int8)
    split[[1, 4, 8]] = 2          # test
    split[[7]] = 1                # validation
    write_dataset(tmp_path / "in.h5", structs, split=split)
    cfg = _cfg(tmp_path, "split", method="taylor")
    run_cli(capsys, ["augment", str(cfg)])
    ds, S = _arrays(tmp_path / "split.h5")
    synth = ds.column("synthetic").astype(bool)
    parents = set(ds.column("parent")[synth].tolist())
    assert parents == set(np.flatnonzero(split == 0).tolist())
    out_split = np.asarray(ds.column("split"))
    np.testing.assert_array_equal(out_split[~synth], split)       # originals keep their split
    assert (out_split[synth] == 0).all()                           # copies of training structures


def test_report_table_lists_per_element_length_scales():
    from distmlip.gpr.augment import format_table
    g = {"weight_eV": 1.0, "length_scale": 0.5, "length_scale_by_group": {"Au": 0.5, "Cu": 0.75},
         "noise_energy_eV": 1e-3, "noise_force_eVA": 1e-2, "jitter": 0.0, "n_local": 1}
    rep = {"subsets": [{"subset": "AuCu3_0", "n_reference": 2, "n_copies": 4, "n_kept": 4,
                        "uncertainty_eV": {"mean": 0.01, "max": 0.02}, "gpr": g, "time_total_s": 1.0},
                       {"subset": "Cu4_0", "n_reference": 2, "gpr": dict(g, length_scale_by_group=None)}],
           "n_input": 4, "n_synthetic": 4, "n_output": 8, "n_candidates": 0}
    rows = format_table(rep).splitlines()
    assert rows[2].endswith("Au 0.5 Cu 0.75") and rows[3].endswith("0.5")


# ------------------------------------------------------------------------------ shared hyperparameters
def _two_cu_subsets(path):
    """Two Cu subsets (4- and 8-atom periodic cells) and one Al subset: one chemistry group."""
    from ase.build import bulk

    out = _rattled(lambda: bulk("Cu", "fcc", a=3.6, cubic=True), 5, 0.05, 0, "cu4")
    out += _rattled(lambda: bulk("Cu", "fcc", a=3.62, cubic=True).repeat((2, 1, 1)), 5, 0.05, 30, "cu8")
    out += _al_cells()
    write_dataset(path, out)


def test_shared_hyperparameters_carry_over_in_physical_units(tmp_path, capsys):
    """gpr.share: chemistry: the 4-atom Cu subset takes the 8-atom one's search (the larger);
    in physical units its prior weight, length scale and force noise are the head's, its energy
    noise sqrt(4/8) times the head's, its descriptor scale the head's; Al fits its own.  The
    same through `distmlip gpr fit` and augment (1 vs 2 ranks identical); a rerun after the
    head's hyperparameter file is lost recomputes the head only."""
    from distmlip.gpr.store import fit_path, load_fit

    _two_cu_subsets(tmp_path / "in.h5")
    gpr = {"fingerprint": "local", "share": "chemistry", "fit_iterations": 8, "fit_restarts": 1}
    cfg = _cfg(tmp_path, "sh", gpr=gpr)
    res = run_cli(capsys, ["gpr", "fit", str(cfg), "--out", str(tmp_path / "fits")])
    assert "Cu4_0: fingerprint local (hyperparameters of Cu8_0)" in res.stdout
    fits = {n: load_fit(fit_path(tmp_path / "fits", n)) for n in ("Cu4_0", "Cu8_0", "Al2_0")}
    h, f = fits["Cu8_0"]["model"].info, fits["Cu4_0"]["model"].info
    assert f["energy_scale_eV"] != pytest.approx(h["energy_scale_eV"], rel=1e-3)   # units differ
    for k in ("weight_eV", "length_scale", "noise_force_eVA"):
        assert f[k] == pytest.approx(h[k], rel=1e-10), k
    assert f["noise_energy_eV"] == pytest.approx(h["noise_energy_eV"] * np.sqrt(0.5), rel=1e-10)
    assert fits["Cu4_0"]["fingerprint"].component_scale() == fits["Cu8_0"]["fingerprint"].component_scale()
    assert "fitted" not in f and "fitted" in h and "fitted" in fits["Al2_0"]["model"].info

    run_cli(capsys, ["augment", str(cfg)])
    res = mpirun(2, ["-m", "distmlip", "augment", str(_cfg(tmp_path, "sh2", gpr=gpr))])
    assert "take the GPR hyperparameters of Cu8_0" in res.stdout
    _, A = _arrays(tmp_path / "sh.h5")
    _, B = _arrays(tmp_path / "sh2.h5")
    assert [(a.energy, a.uncertainty) for a in A] == [(b.energy, b.uncertainty) for b in B]
    rep = {r["subset"]: r for r in json.loads((tmp_path / "sh.report.json").read_text())["subsets"]}
    assert rep["Cu4_0"]["hyperparameters_from"] == "Cu8_0" and "hyperparameters_from" not in rep["Al2_0"]
    assert rep["Cu4_0"]["gpr"]["weight_eV"] == pytest.approx(h["weight_eV"], rel=1e-10)
    # the augment labels of the follower equal those of the saved fit (one code path)
    ds, S = _arrays(tmp_path / "sh.h5")
    cu4 = [s for s in S if s.synthetic and ds.subsets[s.subset]["name"] == "Cu4_0"]
    from distmlip.gpr.cli import predict_structures
    e, _, _ = predict_structures(fits["Cu4_0"], cu4, forces=False)
    # augment predicts in chunks of parents: the sum k_*^T alpha cancels terms many orders larger
    # than the energy, so another BLAS blocking moves it by up to ~1e-7 eV (labels carry meV sigma)
    np.testing.assert_allclose(e, [s.energy for s in cu4], rtol=0, atol=1e-6)

    (tmp_path / "sh.h5.shards" / "subset_00001.hyper.json").unlink()     # Cu8_0 is subset 1
    (tmp_path / "sh.h5").unlink()
    res = run_cli(capsys, ["augment", str(cfg)])
    assert res.stdout.count("finished earlier, skipped") == 2 and "subset Cu8_0 (" in res.stdout
    _, C = _arrays(tmp_path / "sh.h5")
    assert [c.energy for c in C] == [a.energy for a in A]
    # without sharing the follower searches its own (another output, another shard key)
    run_cli(capsys, ["augment", str(cfg), "--set", "gpr.share=none", "--set", "output=" + str(tmp_path / "own.h5")])
    _, D = _arrays(tmp_path / "own.h5")
    assert [d.energy for d in D] != [a.energy for a in A]


def _emt_energy(s):
    from ase.calculators.emt import EMT

    a = s.to_ase()
    a.calc = EMT()
    return a.get_potential_energy()


def _group_augment(tmp_path, capsys, out, name):
    """augment (M = 6, fingerprint auto) of the structures ``out``, each its own subset, and
    the labels' errors against EMT's energies of the copies: (output of the CLI, report entries,
    config path, err, rise), every copy checked to keep its parent's atom order."""
    write_dataset(tmp_path / "in.h5", out)
    assert len(H5Dataset(tmp_path / "in.h5").subsets) == len(out)
    cfg = _cfg(tmp_path, name, copies=6, gpr={"fingerprint": "auto"})
    res = run_cli(capsys, ["augment", str(cfg)])
    rep = json.loads((tmp_path / f"{name}.report.json").read_text())
    assert [r["n_kept"] for r in rep["subsets"]] == [6] * len(out)
    _, S = _arrays(tmp_path / f"{name}.h5")
    err, rise = [], []
    for s in S[len(out):]:
        p = S[s.parent]
        assert np.array_equal(s.numbers, p.numbers)
        e = _emt_energy(s)
        err.append(s.energy - e)
        rise.append(e - p.energy)
    # labels close to EMT's energies of the copies, without the one-structure fit's low bias
    assert np.mean(rise) > 0.02
    assert np.mean(np.abs(err)) < 0.15 * np.mean(rise), (np.mean(np.abs(err)), np.mean(rise))
    return res, rep["subsets"], cfg, np.array(err), np.array(rise)


def test_one_composition_in_many_atom_orders_is_one_gpr(tmp_path, capsys):
    """Cu3Au cells with the Au atom on each of the four sites: four atom orders, four subsets of
    one structure.  Fitted alone, a one-structure GPR missed 85-95 % of a copy's energy rise
    (and is now refused); as one composition group they share one local-kernel GPR."""
    from ase.build import bulk

    out = []
    for k in range(4):
        a = bulk("Cu", "fcc", a=3.7, cubic=True)
        a.symbols[k] = "Au"
        a.rattle(0.05, seed=40 + k)
        out.append(emt_structure(a, f"cu3au_{k}", k))
    res, rep, cfg, _, _ = _group_augment(tmp_path, capsys, out, "grp")
    assert "4 atom orders" in res.stdout
    assert all(r["fingerprint"]["kind"] == "local" and len(r["gpr_group"]) == 4 for r in rep)
    # the group's time once, on its first subset (each member printed the group's total before)
    head = rep[0]["gpr_group"][0]
    assert res.stdout.count(f"in the GPR of {head}") == 3 and "(^: in the time of its GPR group" in res.stdout
    # a rerun reuses the group's shards
    res = run_cli(capsys, ["augment", str(cfg)])
    assert "finished earlier" in res.stdout


def test_random_alloys_of_one_element_set_are_one_gpr(tmp_path, capsys):
    """Cu-Au cells of 8 atoms, each of its own composition (a random alloy: one subset of one
    structure per composition, which alone gets no copies): one local-kernel GPR for all of them,
    the atoms' elements carried per structure and the energies modelled about per-element
    energies; the copies' labels close to EMT's.  Shifting the energies by per-element constants
    (another choice of atomic reference energies) shifts every label by the same sum."""
    from ase.build import bulk

    rng = np.random.default_rng(3)
    out = []
    for k, n_au in enumerate([1, 2, 3, 4, 5, 6, 2]):
        a = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 1, 1))
        a.symbols[rng.choice(8, n_au, replace=False)] = "Au"
        a.rattle(0.05, seed=60 + k)
        out.append(emt_structure(a, f"cuau_{k}", k))
    res, rep, _, _, rise = _group_augment(tmp_path, capsys, out, "alloy")
    assert "6 compositions of AuCu with 8 atoms: one GPR" in res.stdout, res.stdout
    assert all(r["fingerprint"]["kind"] == "local" and r["fingerprint"].get("mixed") for r in rep)
    # other atomic reference energies: the same GPR about other per-element means (hyperparameters
    # given: a search's optimum moves with the rounding of its inputs)
    hyper = {k: rep[0]["gpr"][k] for k in ("weight", "length_scale", "noise_energy", "noise_force")}
    run_cli(capsys, ["augment", str(_cfg(tmp_path, "alloy1", copies=6, gpr=dict(hyper, fingerprint="local")))])
    ref = {29: -2.5, 79: 1.25}
    for s in out:
        s.energy = s.energy + sum(ref[int(z)] for z in s.numbers)
    write_dataset(tmp_path / "in2.h5", out)
    cfg2 = _cfg(tmp_path, "alloy2", copies=6, input=str(tmp_path / "in2.h5"), gpr=dict(hyper, fingerprint="local"))
    run_cli(capsys, ["augment", str(cfg2)])
    _, S1 = _arrays(tmp_path / "alloy1.h5")
    _, S2 = _arrays(tmp_path / "alloy2.h5")
    d = [b.energy - a.energy - sum(ref[int(z)] for z in a.numbers) for a, b in zip(S1[7:], S2[7:])]
    assert np.abs(d).max() < 1e-6 * np.mean(rise), np.abs(d).max()


def test_a_wrong_energy_in_a_group_is_left_out_and_the_fit_repeated(tmp_path, capsys):
    """Random Cu-Au cells, one with its energy 3 eV off (forces right): no subset check can see it
    (one structure each), and in the group fit it put the energy noise on its bound and spoiled
    every label while its leave-one-out z stayed below outlier_z (sweep 25: labels 156 meV off,
    exit 0).  The GPR is fitted again without it, explains the others much better, and the
    structure is left out and named, its subset without copies; the others' labels are close to
    EMT's."""
    from ase.build import bulk

    rng = np.random.default_rng(9)
    out = []
    for k in range(20):
        a = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 1, 1))
        a.symbols[rng.choice(8, 2 + k % 3, replace=False)] = "Au"
        a.rattle(0.05, seed=120 + k)
        out.append(emt_structure(a, f"bad_{k}", k))
    out[4].energy += 3.0
    write_dataset(tmp_path / "in.h5", out)
    res = run_cli(capsys, ["augment", str(_cfg(tmp_path, "bad", copies=6, gpr={"fingerprint": "local"}))])
    assert "structure 4's leave-one-out energy error +3" in res.stdout and "fitting again without it" in res.stdout
    assert "structure 4 (bad_4, index 4): a reference label that the other structures contradict" in res.stderr
    assert res.stderr.count("a reference label that the other structures contradict") == 1, res.stderr
    rep = json.loads((tmp_path / "bad.report.json").read_text())["subsets"]
    bad = [r for r in rep if r.get("label_outliers")]
    assert len(bad) == 1 and [o["structure"] for o in bad[0]["label_outliers"]] == [4]
    # every other structure has its copies; the wrong one none
    assert sum(r["n_reference"] for r in rep) == 19 and all(r["n_copies"] == 6 * r["n_reference"] for r in rep)
    if bad[0]["n_reference"] == 0:
        assert bad[0]["skipped"] and "contradicts the other structures" in bad[0]["reason"]
    _, S = _arrays(tmp_path / "bad.h5")
    err = [s.energy - _emt_energy(s) for s in S[20:]]
    rise = [_emt_energy(s) - S[s.parent].energy for s in S[20:]]
    assert np.mean(np.abs(err)) < 0.15 * np.mean(rise), (np.mean(np.abs(err)), np.mean(rise))


def test_lone_structures_of_other_atom_counts_are_one_padded_gpr(tmp_path, capsys):
    """Cu-Au cells with 0-3 vacancies, one structure per atom count (each alone in its element
    set and atom count, which alone gets no copies): one GPR on all of them, each padded to the
    largest cell; the copies' labels close to EMT's."""
    from ase.build import bulk

    rng = np.random.default_rng(5)
    out = []
    for k, vac in enumerate([0, 1, 2, 3]):
        a = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 1, 1))
        a.symbols[rng.choice(8, 2 + k % 2, replace=False)] = "Au"
        del a[list(rng.choice(8, vac, replace=False))]
        a.rattle(0.05, seed=80 + k)
        out.append(emt_structure(a, f"vac_{k}", k))
    res, rep, _, err, rise = _group_augment(tmp_path, capsys, out, "vac")
    assert "of AuCu with 5-8 atoms: one GPR" in res.stdout, res.stdout
    assert all(r["fingerprint"].get("padded_to") == 8 and len(r["gpr_group"]) == 4 for r in rep)
    assert all(r["gpr"]["n_obs"] == 4 + 3 * (8 + 7 + 6 + 5) for r in rep)


def test_subsets_without_usable_references_get_no_copies(tmp_path, capsys):
    """A one-atom subset (a displacement only translates it), a subset without forces and a
    subset of one structure (its hyperparameters cannot be fitted) get no copies, each with its
    reason in the report; the run goes on (a subset without forces used to stop it with an
    internal error)."""
    from ase import Atoms
    from ase.build import bulk

    out = _rattled(lambda: bulk("Cu", "fcc", a=3.6), 3, 0.0, 0, "one_atom")
    noforce = _rattled(lambda: bulk("Ni", "fcc", a=3.52).repeat((2, 1, 1)), 3, 0.04, 5, "noforce")
    for s in noforce:
        s.forces = None
    out += noforce
    out += _rattled(lambda: Atoms("Cu3Ni", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]]),
                    1, 0.08, 10, "single")
    out += _al_cells()
    write_dataset(tmp_path / "in.h5", out)
    cfg = _cfg(tmp_path, "skips")
    res = run_cli(capsys, ["augment", str(cfg)])
    rep = {r["subset"]: r for r in json.loads((tmp_path / "skips.report.json").read_text())["subsets"]}
    assert rep["Cu_0"]["skipped"] and "one atom" in rep["Cu_0"]["reason"]
    assert rep["Ni2_0"]["skipped"] and "no structures with forces" in rep["Ni2_0"]["reason"]
    assert rep["Cu3Ni_0"]["skipped"] and "one reference structure" in rep["Cu3Ni_0"]["reason"]
    assert rep["Al2_0"]["n_kept"] == 4 * 4 and not rep["Al2_0"].get("skipped")
    assert res.stdout.count("no copies:") == 3
    ds = H5Dataset(tmp_path / "skips.h5")
    assert ds.n_structures == len(out) + 16
    # one summary at the end (each subset's line scrolls past on data of many subsets)
    assert "augment: 3 of 4 subset(s) got no copies" in res.stderr
    assert "1 for 'one reference structure: its GPR hyperparameters cannot be fitted' (Cu3Ni_0)" in res.stderr
    assert "gpr.share: chemistry (hyperparameters from" in rep["Cu3Ni_0"]["reason"]
    # no copies at all: said as such (the output is the input, training on it energy-only); with
    # gpr.share already on, the reason does not recommend it
    write_dataset(tmp_path / "in.h5", out[:3] + out[6:7])
    res = run_cli(capsys, ["augment", str(_cfg(tmp_path, "none", gpr={"share": "chemistry"}))])
    assert "augment made NO copies" in res.stderr and "energy-only training, not GPR-ANN" in res.stderr
    rep = {r["subset"]: r for r in json.loads((tmp_path / "none.report.json").read_text())["subsets"]}
    assert "found no subset of the same elements" in rep["Cu3Ni_0"]["reason"]


def test_auto_fingerprint_scores_full_loo_with_forces(capsys):
    """``fingerprint: auto`` compares leave-one-out errors over all structures, forces included:
    the searches' sub-sample LOO (here favouring 'cartesian', as on MD frames of a Pt slab with
    CO where the local kernel's sub-sample held 6 structures) must not decide."""
    from distmlip.gpr.augment import _choose_fingerprint

    class Fitted:
        def __init__(self, sub, e, f):
            self.info = {"loo_energy_mae_eV": sub}
            self._all = {"loo_all_energy_mae_eV": e, "loo_all_force_mae_eVA": f}

        def calibrate(self):
            self.info.update(self._all)
            return self

    # local: 0.041 eV on its 6-structure sub-sample, 0.0037 / 0.0062 over all 36 structures;
    # cartesian: 0.0062 on 26, 0.0079 / 0.104 over all (measured, docs/gpr.md)
    best, ch = _choose_fingerprint(["local", "cartesian"], [Fitted(0.041, 0.0037, 0.0062),
                                                           Fitted(0.0062, 0.0079, 0.104)], 38, 0.03, "s")
    assert best == 0 and ch["local"] == pytest.approx(0.0037 + 0.03 * np.sqrt(114) * 0.0062)
    # equal energy LOO: the force term decides
    best, _ = _choose_fingerprint(["local", "inverse"], [Fitted(0.01, 0.004, 0.05), Fitted(0.01, 0.004, 0.01)],
                                  10, 0.03, "s")
    assert best == 1
    # without LOO over all structures (kernel too large): the sub-sample's, with a warning

    class Big(Fitted):
        def calibrate(self):
            return self

    best, ch = _choose_fingerprint(["local", "cartesian"], [Big(0.02, 0, 0), Big(0.01, 0, 0)], 10, 0.03, "s")
    assert best == 1 and ch == {"local": 0.02, "cartesian": 0.01}
    assert "too large for leave-one-out" in capsys.readouterr().err


def test_fixed_atoms_checked_before_any_fit_and_all_fixed_gives_no_copies(data, capsys):
    """fixed_atoms out of a subset's range is a ConfigError at the start (naming subset and
    range), not when the subset's turn comes; a subset with every atom fixed gets no copies (they
    would repeat the parent) and says why."""
    cfg = _cfg(data, "fx1", method="taylor", subsets={"Al2_0": {"fixed_atoms": [0, 5]}})
    res = run_cli(capsys, ["augment", str(cfg)], check=False)
    assert res.returncode == 2 and "subset 'Al2_0': fixed_atoms [5] out of range" in res.stderr
    assert "0..1" in res.stderr and "subset Cu4_0" not in res.stdout
    cfg = _cfg(data, "fx2", method="taylor", subsets={"Al2_0": {"fixed_atoms": [0, 1]}})
    res = run_cli(capsys, ["augment", str(cfg)])
    assert res.returncode == 0
    rep = json.loads((data / "fx2.report.json").read_text())
    r = next(r for r in rep["subsets"] if r["subset"] == "Al2_0")
    assert r["n_copies"] == 0 and "every atom is in fixed_atoms" in r["reason"]


def test_uncalibrated_sigma_is_warned(tmp_path, capsys):
    """A GPR on fewer than 5 reference structures cannot calibrate its sigmas on leave-one-out
    errors: augment says so (the copies' sigmas gate max_uncertainty and the weights)."""
    write_dataset(tmp_path / "in.h5", _rattled(lambda: __import__("ase.build", fromlist=["bulk"]).bulk(
        "Al", "fcc", a=4.05).repeat((2, 1, 1)), 3, 0.05, 20, "al"))
    res = run_cli(capsys, ["augment", str(_cfg(tmp_path, "few"))])
    assert "the GPR's sigmas are not calibrated: 3 reference structure(s)" in res.stderr


@pytest.mark.parametrize("over,msg", [("seed=-1", "'seed' must be an integer >= 0"),
                                      ("delta=50", "'delta' must be a displacement in A between 0 and 0.5"),
                                      ("delta=0", "every copy would equal its parent"),
                                      ("model.hidden=[8,", "the value is not valid YAML"),
                                      ("copies=-1", "'copies' must be an integer >= 0 or 'auto'"),
                                      ("copies=often", "does not fit: expected an integer or 'auto'"),
                                      ("copies='20'", "a quoted number is a string: write it without quotes"),
                                      ("delta=big", "does not fit"),
                                      ("subsets={Al2_0: {copies: -2}}", "subsets.Al2_0.copies' must be"),
                                      ("copies=auto", "method 'taylor' fits no GPR"),
                                      ("subsets={Al2_0: {delta: auto}}", "subsets.Al2_0.delta: 'auto'")])
def test_augment_nonsense_values_are_config_errors(data, capsys, over, msg):
    res = run_cli(capsys, ["augment", str(_cfg(data, "bad", method="taylor")), "--set", over], check=False)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_damaged_shard_is_recomputed_not_used(data, capsys):
    """A truncated or bit-flipped restart shard (a crash, a full disk, a bad block) is named and
    recomputed; the output equals the undamaged run's."""
    import shutil

    cfg = _cfg(data, "sh", method="taylor")
    run_cli(capsys, ["augment", str(cfg)])
    ref = H5Dataset(data / "sh.h5").content_id
    shard = sorted((data / "sh.h5.shards").glob("subset_*.npz"))[0]
    good = shard.read_bytes()
    for damage in (good[:len(good) // 2], good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF])
                   + good[len(good) // 2 + 1:]):
        (data / "sh.h5").unlink()
        shard.write_bytes(damage)
        res = run_cli(capsys, ["augment", str(cfg)])
        assert "unreadable shard" in res.stderr and H5Dataset(data / "sh.h5").content_id == ref
    shutil.rmtree(data / "sh.h5.shards")


def test_local_subsample_that_explains_the_set_poorly_is_searched_again(tmp_path, capsys, monkeypatch):
    """Hyperparameters from a few neighbouring structures (fit_subsample local) once smoothed a
    vacancy cell's volume dependence away (labels 44 meV off, silently): when the LOO error over
    all structures exceeds the sub-sample's by SUBSAMPLE_LOO_RATIO, the search is repeated on a
    random sub-sample and the fit with the smaller all-structure LOO is kept.  The ratio is set to
    0 here so that the second search always runs on this small set."""
    from distmlip.gpr import augment as aug

    from ase.build import bulk

    def strained(k):
        a = bulk("Cu", "fcc", a=3.6 * (1 + 0.01 * (k % 4 - 1.5)), cubic=True)
        return a

    structs = []
    for k in range(8):
        a = strained(k)
        a.rattle(0.05, seed=40 + k)
        structs.append(emt_structure(a, "cu_vol", k))
    write_dataset(tmp_path / "in.h5", structs)
    monkeypatch.setattr(aug, "SUBSAMPLE_LOO_RATIO", 0.0)
    cfg = _cfg(tmp_path, "g", gpr={"fingerprint": "local", "fit_iterations": 8, "fit_restarts": 1,
                                   "local": {"fit_max_obs": 40}})
    res = run_cli(capsys, ["augment", str(cfg)])
    assert "explain the set poorly" in res.stdout and "searching again on a random sub-sample" in res.stdout
    assert "keeping the" in res.stdout
    rep = json.load(open(tmp_path / "g.report.json"))
    g = rep["subsets"][0]["gpr"]
    assert set(g["fit_subsample_retried"]) == {"local_loo_all_eV", "random_loo_all_eV"}


def test_a_reference_with_a_wrong_energy_is_named_and_left_out(tmp_path, capsys):
    """One reference 100 eV off (sweep 7) spoiled the GPR fitted to it: every copy of its subset
    was 4.5 eV off on average, exit 0.  Its energy contradicts its forces and its neighbours'
    energies; it is now named, left out of the fit and given no copies, and the other copies'
    labels are right (against EMT itself)."""
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.emt import EMT

    structs = _rattled(lambda: bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1)), 12, 0.08, 40, "cu8")
    structs[3].energy += 100.0
    write_dataset(tmp_path / "in.h5", structs)
    res = run_cli(capsys, ["augment", str(_cfg(tmp_path, "out"))])
    assert "structure 3 (cu8, index 3)" in res.stderr and "Left out of the GPR fit" in res.stderr, res.stderr
    ds, S = _arrays(tmp_path / "out.h5")
    syn = [s for s in S if s.synthetic]
    assert syn and all(s.parent != 3 for s in syn)
    errs = []
    for s in syn:
        p = S[s.parent]
        a = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        b = Atoms(numbers=p.numbers, positions=p.positions, cell=p.cell, pbc=p.pbc)
        a.calc, b.calc = EMT(), EMT()
        errs.append((s.energy - p.energy) - (a.get_potential_energy() - b.get_potential_energy()))
    assert np.abs(errs).mean() < 0.01, np.abs(errs).mean()
    rep = json.loads((tmp_path / "out.report.json").read_text())
    assert rep["subsets"][0]["label_outliers"][0]["structure"] == 3


def test_flat_cell_copies_get_a_positive_sigma(tmp_path, capsys):
    """A 2-atom cell with c = 1.8 A: the local kernel's length scale ends on its bound, and the
    latent variance cancelled to exactly 0 for every copy (sweep 7)."""
    from ase import Atoms

    write_dataset(tmp_path / "in.h5", _rattled(lambda: Atoms(
        "Cu2", positions=[[0, 0, 0], [1.8, 1.8, 0]], cell=[[3.6, 0, 0], [0, 3.6, 0], [0, 0, 1.8]], pbc=True),
        8, 0.04, 60, "flat"))
    run_cli(capsys, ["augment", str(_cfg(tmp_path, "out"))])
    _, S = _arrays(tmp_path / "out.h5")
    u = np.array([s.uncertainty for s in S if s.synthetic])
    assert len(u) == 32 and (u > 0).all(), u


def test_loo_outlier_rule():
    """The backstop after the fit: leave-one-out residuals far outside their robust spread."""
    from distmlip.gpr.augment import _loo_outliers

    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, 40)
    assert _loo_outliers(r, 25.0) == []
    r[7] = 3.0
    assert _loo_outliers(r, 25.0) == [7] and _loo_outliers(r, 0.0) == []
    r2 = r.copy()
    r2[7] = 0.05           # 5 sigma but below the 0.1 eV floor
    assert _loo_outliers(r2, 25.0) == []
    assert _loo_outliers(np.r_[np.nan, r[:3]], 25.0) == []        # too few to judge


def test_a_gpr_that_learned_no_forces_is_warned_and_its_copies_are_candidates(tmp_path, capsys):
    """Cu8 cells rattled by 0.0007 A (energies spanning ~1e-4 eV): the GPR's leave-one-out force
    error equalled the forces' RMS and its jitter was of the kernel's scale, and every copy's
    label was off by the whole energy rise (0 % within 2 sigma) -- exit 0, no warning, no
    candidates.  Now both are named with what to do, and the copies go to the candidates file."""
    from ase.build import bulk

    structs = _rattled(lambda: bulk("Cu", "fcc", a=3.59, cubic=True).repeat((2, 1, 1)), 12, 0.0007, 70, "tiny")
    write_dataset(tmp_path / "in.h5", structs)
    res = run_cli(capsys, ["augment", str(_cfg(tmp_path, "out", copies=3, gpr={"fingerprint": "local",
                                                                              "fit_iterations": 15}))])
    assert "subset Cu8_0: field 'forces': the GPR learned little about the forces" in res.stderr, res.stderr
    assert "a smaller delta" in res.stderr
    rep = json.loads((tmp_path / "out.report.json").read_text())
    sub = rep["subsets"][0]
    assert sub["n_kept"] == 0 and sub["n_candidates"] == 36
    assert sub["fit_warnings"][0]["what"] == "loo_force"


def test_copies_rise_over_first_order_is_reported_not_warned_about(capsys):
    """rise_over_first_order (the copies' mean rise over its first-order part delta F_rms sqrt(3 n))
    is reported per subset; it is not warned about: at equal epochs a smaller delta did not help
    (the EC dimers, docs/results.md ninth session)."""
    from types import SimpleNamespace

    from distmlip.gpr.augment import _report_curvature

    rng = np.random.default_rng(0)
    structs = [SimpleNamespace(forces=rng.normal(size=(20, 3)), natoms=20) for _ in range(4)]
    f_rms = float(np.sqrt(np.mean(np.concatenate([s.forces for s in structs]) ** 2)))
    first = 0.03 * f_rms * np.sqrt(60)
    rep = {"delta_A": 0.03, "label_minus_parent_eV": {"mean": 2.4 * first}}
    _report_curvature(rep, {"structs": structs, "name": "X_0"})
    assert rep["rise_over_first_order"] == pytest.approx(2.4)
    assert capsys.readouterr().err == ""
    # fixed atoms carry no first-order rise: only the moving ones count
    rep = {"delta_A": 0.03, "fixed_atoms": list(range(10)), "label_minus_parent_eV": {"mean": 1.0}}
    _report_curvature(rep, {"structs": structs, "name": "X_0"})
    f_moving = float(np.sqrt(np.mean(np.concatenate([s.forces[10:] for s in structs]) ** 2)))
    assert rep["rise_over_first_order"] == pytest.approx(1.0 / (0.03 * f_moving * np.sqrt(30)))


def test_copies_and_delta_auto_rule():
    """copies/delta 'auto' (choose_copies_delta): M grows with the free atoms' degrees of freedom
    and falls with the estimated label error against a copy's first-order rise; delta stays at
    0.03 A unless the LOO energy error is large against that rise; a number given stays."""
    from distmlip.gpr.augment import COPIES_AUTO_MAX, COPIES_AUTO_MIN, choose_copies_delta

    rng = np.random.default_rng(0)
    F = rng.normal(0.0, 0.5, size=(6, 32, 3))
    f_rms = float(np.sqrt(np.mean(F ** 2)))
    good = {"loo_all_energy_mae_eV": 0.001, "loo_all_force_mae_eVA": 0.01 * f_rms}
    M, d, why = choose_copies_delta("auto", "auto", good, F, 32)
    assert d == 0.03 and M == 48 and why["dof"] == 96 and "96 degrees of freedom" in why["reason"]
    assert why["label_error_ratio"] == pytest.approx(0.001 / (0.03 * f_rms * np.sqrt(96)) + 0.01)
    # fixed atoms move nothing: 3 x 16 free degrees of freedom
    assert choose_copies_delta("auto", 0.03, good, F, 32, fixed_atoms=range(16))[0] == 24
    # few degrees of freedom: the lower bound; many: the upper one
    assert choose_copies_delta("auto", 0.03, good, F[:, :2], 2)[0] == COPIES_AUTO_MIN
    big = rng.normal(0.0, 0.5, size=(2, 200, 3))
    assert choose_copies_delta("auto", 0.03, good, big, 200)[0] == COPIES_AUTO_MAX
    # a large LOO energy error: delta grows until it is a quarter of the first-order rise
    bad_e = {"loo_all_energy_mae_eV": 0.05, "loo_all_force_mae_eVA": 0.01 * f_rms}
    M2, d2, why2 = choose_copies_delta("auto", "auto", bad_e, F, 32)
    assert d2 == pytest.approx(0.05 / (f_rms * np.sqrt(96) * (0.25 - 0.01))) and 0.03 < d2 <= 0.06
    assert why2["label_error_ratio"] == pytest.approx(0.25) and M2 == int(np.ceil(48 / (1 + 0.25 ** 2)))
    # a force error that no delta lowers: delta stays, fewer copies
    bad_f = {"loo_all_energy_mae_eV": 0.001, "loo_all_force_mae_eVA": 0.8 * f_rms}
    M3, d3, why3 = choose_copies_delta("auto", "auto", bad_f, F, 32)
    assert d3 == 0.03 and M3 < 48 and "no delta lowers it" in why3["reason"]
    # a non-finite LOO error (an ill-conditioned kernel) says nothing: the default values, no crash
    for info in ({"loo_all_energy_mae_eV": float("nan")},
                 {"loo_all_energy_mae_eV": 0.001, "loo_all_force_mae_eVA": float("inf")}):
        M4, d4, why4 = choose_copies_delta("auto", "auto", info, F, 32)
        assert (M4, d4) == (20, 0.03) and "no finite leave-one-out errors" in why4["reason"]
    # a number given stays as given
    assert choose_copies_delta(7, "auto", bad_e, F, 32)[0] == 7
    assert choose_copies_delta("auto", 0.02, bad_e, F, 32)[1] == 0.02


def test_augment_copies_delta_auto_end_to_end(data, capsys, monkeypatch):
    """copies: auto and delta: auto per subset: the choice is logged and reported, every reference
    gets the chosen M copies at the chosen delta, two ranks give the output of one, and a rerun
    with another choice (a number, or another rule) recomputes instead of reusing the shards."""
    import distmlip.gpr.augment as aug

    extra = dict(copies="auto", subsets={"Al2_0": {"delta": "auto"}, "Cu4_0": {"copies": 3}}, pool=1,
                 gpr={"fit_max_obs": 120, "fit_iterations": 15, "fingerprint": "local"})
    cfg1 = _cfg(data, "auto1", **extra)
    res = run_cli(capsys, ["augment", str(cfg1)])
    assert "subset Al2_0: copies and delta auto: M = 10, delta = " in res.stderr + res.stdout
    assert "subset Cu3Ni_0: copies auto: M = 10, delta = 0.03 A" in res.stderr + res.stdout
    rep = {r["subset"]: r for r in json.loads((data / "auto1.report.json").read_text())["subsets"]}
    assert rep["Cu4_0"]["copies_per_structure"] == 3 and "auto_choice" not in rep["Cu4_0"]
    assert rep["Cu4_0"]["n_copies"] == 6 * 3
    for name, n_ref in (("Cu3Ni_0", 5), ("Al2_0", 4)):
        r = rep[name]
        ch = r["auto_choice"]
        assert r["copies_per_structure"] == ch["copies"] == 10 and r["n_copies"] == n_ref * 10
        assert r["delta_A"] == ch["delta_A"] and ch["loo_energy_eV"] == r["gpr"]["loo_all_energy_mae_eV"]
        assert ch["asked"]["copies"] == "auto"
    # the copies lie delta from their parents (per component, free atoms, net translation removed)
    ds, S = _arrays(data / "auto1.h5")
    d = np.concatenate([(s.positions - S[s.parent].positions).ravel() for s in S
                        if s.synthetic and ds.subsets[s.subset]["name"] == "Cu3Ni_0"])
    assert np.std(d) == pytest.approx(0.03 * np.sqrt(3 / 4), rel=0.3)
    # two ranks: the same choice and copies
    cfg2 = _cfg(data, "auto2", **extra)
    mpirun(2, ["-m", "distmlip", "augment", str(cfg2)])
    _, B = _arrays(data / "auto2.h5")
    assert len(S) == len(B)
    for a, b in zip(S, B):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.energy, a.parent, a.uncertainty) == (b.energy, b.parent, b.uncertainty)
    # restart identity: the auto subsets' shards are not those of a numeric choice, nor of another rule
    res = run_cli(capsys, ["augment", str(cfg1), "--set", "copies=10"])
    assert res.stdout.count("finished earlier, skipped") == 1          # Cu4_0 (copies 3) only
    monkeypatch.setitem(aug.AUTO_RULE, "per_dof", 0.75)
    res = run_cli(capsys, ["augment", str(cfg1)])
    assert res.stdout.count("finished earlier, skipped") == 1
    res = run_cli(capsys, ["augment", str(cfg1)])
    assert res.stdout.count("finished earlier, skipped") == 3
    assert all(t["copies_per_epoch"] == 0 for t in ds.subsets)         # pool 1: M fixed copies, no record


def test_augment_copies_auto_pool(data, capsys):
    """pool: 3 (the default, auto, with copies: auto) labels 3 M copies per reference and records M
    per subset in the data set (subsets/copies_per_epoch, what training draws per epoch; 0 for a
    numeric subset); its shards are not those of M fixed copies (pool: 1); pool > 1 without any
    copies: auto is refused."""
    import distmlip.gpr.augment as aug
    from distmlip.config import from_dict
    from distmlip.errors import ConfigError

    extra = dict(copies="auto", subsets={"Cu4_0": {"copies": 3}},
                 gpr={"fit_max_obs": 120, "fit_iterations": 15, "fingerprint": "local"})
    run_cli(capsys, ["augment", str(_cfg(data, "pool1", **extra, pool=1))])
    res = run_cli(capsys, ["augment", str(_cfg(data, "pool1", **extra, pool=3))])
    assert res.stdout.count("finished earlier, skipped") == 1          # Cu4_0 (copies 3) only
    assert "subset Cu3Ni_0: copies auto: M = 10 per training epoch, from a pool of 30 " \
           "(training.copies_per_epoch: auto), delta = 0.03 A" in res.stderr + res.stdout
    rep = {r["subset"]: r for r in json.loads((data / "pool1.report.json").read_text())["subsets"]}
    for name, n_ref in (("Cu3Ni_0", 5), ("Al2_0", 4)):
        r = rep[name]
        assert r["auto_choice"]["copies"] == r["copies_per_epoch"] == 10 and r["n_copies"] == n_ref * 30
        assert r["copies_per_structure"] == r["auto_choice"]["pool"] == 30
    assert rep["Cu4_0"]["n_copies"] == 6 * 3 and "copies_per_epoch" not in rep["Cu4_0"]
    ds, _ = _arrays(data / "pool1.h5")
    assert {t["name"]: t["copies_per_epoch"] for t in ds.subsets} == {"Cu3Ni_0": 10, "Al2_0": 10, "Cu4_0": 0}
    res = run_cli(capsys, ["augment", str(_cfg(data, "pool1", **extra))])     # the default: auto, 3 here
    assert res.stdout.count("finished earlier, skipped") == 3
    with pytest.raises(ConfigError, match="'pool' .3. multiplies the M of copies: auto"):
        from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "copies": 20, "pool": 3})
    # auto: 3 where a subset has copies: auto, else 1 (numbers label what they say)
    assert from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5"}).pool == aug.POOL_AUTO == 3
    assert from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "copies": 20}).pool == 1
    assert from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "method": "taylor"}).pool == 1
    with pytest.raises(ConfigError, match="'pool' must be an integer >= 1 or auto, got 0"):
        from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "pool": 0})


def test_copies_default_is_auto_for_gpr_and_20_for_taylor():
    """copies not given: 'auto' for method gpr (measured better at equal training time past the
    shortest budgets, docs/gpr.md), 20 for taylor, which fits nothing to choose from."""
    from distmlip.config import from_dict
    from distmlip.gpr import augment as aug

    gpr = from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5"})
    taylor = from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "method": "taylor"})
    given = from_dict(aug.AugmentConfig, {"input": "a.h5", "output": "b.h5", "copies": 7})
    assert (gpr.copies, taylor.copies, given.copies) == ("auto", 20, 7)
    assert gpr.for_subset("any")["copies"] == "auto" and gpr.delta == 0.03


def test_idle_ranks_hint():
    """Fewer units of work than nodes: augment warns that whole nodes wait (idle ranks lend their
    cores only within a node); fewer units than ranks on enough nodes is no warning."""
    from distmlip.gpr.augment import idle_ranks_hint

    assert idle_ranks_hint(3, 2, 1) is None and idle_ranks_hint(1, 4, 1) is None
    assert idle_ranks_hint(2, 64, 2) is None
    msg = idle_ranks_hint(1, 64, 2)
    assert "1 unit(s) of work (subsets) for 64 ranks on 2 nodes: the ranks of 1 node(s) will wait" in msg


def test_lend_plan():
    """Idle ranks lend to the busy ranks of their own node, spread evenly, never across nodes."""
    from distmlip.distributed.partition import lend_plan

    assert lend_plan(["a", "a"], [True, False]) == {0: [1]}
    assert lend_plan(["a"] * 5, [False, True, False, True, False]) == {1: [0, 4], 3: [2]}
    # node b has no busy rank: its ranks lend to nobody; a's idle rank goes to a's busy rank
    assert lend_plan(["a", "a", "b", "b"], [True, False, False, False]) == {0: [1]}
    assert lend_plan(["a", "b"], [True, True]) == {}


def test_one_subset_two_ranks_lend_their_cores(tmp_path, capsys):
    """One subset under mpirun -n 2 (each rank bound to its core, one thread): the idle rank lends
    its core, the working rank runs two threads on both cores, and the copies equal those of one
    process."""
    from ase.build import bulk
    from helpers import REPO, mpirun_exe

    out = _rattled(lambda: bulk("Cu", "fcc", a=3.6, cubic=True), 6, 0.05, 0, "cu_bulk")
    write_dataset(tmp_path / "in.h5", out)
    cfg1, cfg2 = _cfg(tmp_path, "one"), _cfg(tmp_path, "two")
    run_cli(capsys, ["augment", str(cfg1)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [mpirun_exe(), "-n", "2", "--bind-to", "core"] + (["--allow-run-as-root"] if os.geteuid() == 0 else []) \
        + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable, "-m", "distmlip", "augment", str(cfg2)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if res.returncode != 0 and "slots" in res.stderr.lower():
        pytest.skip(f"mpirun cannot place two bound ranks here: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0] augment: 1 idle rank(s) of this node lend their cores: 2 threads" in res.stdout, res.stdout
    if len(os.sched_getaffinity(0)) >= 2:
        assert "2 threads on cores " in res.stdout, res.stdout
    assert "will wait" not in res.stderr
    # lend_cores: false: the working rank keeps its one thread, the labels are those of one process
    cfg3 = _cfg(tmp_path, "kept", lend_cores=False)
    res3 = subprocess.run(cmd[:-1] + [str(cfg3)], capture_output=True, text=True, timeout=300, env=env)
    assert res3.returncode == 0 and "lend their cores" not in res3.stdout, res3.stderr[-3000:]
    _, A = _arrays(tmp_path / "one.h5")
    _, B = _arrays(tmp_path / "two.h5")
    _, C = _arrays(tmp_path / "kept.h5")
    assert len(A) == len(B) == len(C) > len(out)
    for a, b, c in zip(A, B, C):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert (a.energy, a.uncertainty) == (c.energy, c.uncertainty)
        # two threads instead of one: the same labels up to rounding (1e-7 eV measured)
        assert abs(a.energy - b.energy) < 1e-5 * max(1.0, abs(a.energy))
        assert a.uncertainty is None or abs(a.uncertainty - b.uncertainty) < 1e-5


def test_borrowed_cores_in_a_world_of_one_and_the_affinity_of_all_threads():
    """In a world of one nothing is lent; the affinity helper moves every thread of the process
    (a BLAS pool started under a one-core binding keeps that core otherwise) and back."""
    from distmlip.distributed.context import DistContext
    from distmlip.distributed.cores import _set_affinity_of_all_threads, borrowed_cores, cpu_list, process_affinity

    assert cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    with borrowed_cores(DistContext(), busy=True) as lent:
        assert lent is None
    before = process_affinity()
    if before is None:
        pytest.skip("no CPU affinity on this OS")
    assert _set_affinity_of_all_threads(before[:1])
    try:
        assert all(os.sched_getaffinity(int(t)) == {before[0]} for t in os.listdir("/proc/self/task"))
    finally:
        assert _set_affinity_of_all_threads(before)
    assert process_affinity() == before


def test_copies_auto_is_the_same_whether_or_not_memory_splits_the_kernel(tmp_path, capsys, monkeypatch):
    """copies: auto reads the leave-one-out error; where no local GPR gets LOO over all its
    structures (large kernels), an unsplit fit falls back on the search's sub-sample LOO and a
    split one must too: a sweep's 256-atom cells got M = 64 on one run and M = 20 ("default
    values") on the next, when less free memory split the kernel.  The split and the unchecked
    sub-sample are said when they happen."""
    from ase.build import bulk

    from distmlip.gpr import model as gm

    write_dataset(tmp_path / "in.h5", _rattled(lambda: bulk("Cu", "fcc", a=3.61, cubic=True), 14, 0.06, 7, "cu4"))
    init = gm.GPR.__init__

    def no_full_loo(self, *a, **kw):           # as for kernels above the LOO row limit
        init(self, *a, **dict(kw, loo_max_obs=10))
    monkeypatch.setattr(gm.GPR, "__init__", no_full_loo)
    runs = {}
    for name, extra in (("whole", {}), ("split", {"max_kernel_obs": 100})):
        res = run_cli(capsys, ["augment", str(_cfg(tmp_path, name, copies="auto",
                                                   gpr={"fit_max_obs": 60, "fit_iterations": 15, **extra}))])
        rep = json.loads((tmp_path / f"{name}.report.json").read_text())["subsets"][0]
        runs[name] = (rep, res.stdout)
    (rw, ow), (rs, os_) = runs["whole"], runs["split"]
    assert rs["gpr"]["n_local"] > 1 and rw["gpr"].get("n_local", 1) == 1
    assert "default values" not in rs["auto_choice"]["reason"], rs["auto_choice"]
    assert rs["auto_choice"]["loo_energy_eV"] == rw["auto_choice"]["loo_energy_eV"] is not None
    assert rs["copies_per_epoch"] == rw["copies_per_epoch"]
    assert "local GPRs of" in os_ and os_.index("local GPRs of") < os_.index("copies auto:")   # before labels
    for out, rep in ((ow, rw), (os_, rs)):
        assert "not checked against the others" in out and rep["gpr"]["fit_subsample_unchecked"]
