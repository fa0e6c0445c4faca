"""distmlip gpr fit|test|predict, saved fits reused by augment, and the in-place LAPACK helpers of
the likelihood loop."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from distmlip.cli import main as cli_main
from helpers import emt_structure
from distmlip.data.h5store import H5Dataset, write_dataset


def _emt(seed0, n_cl=5, n_al=4):
    from ase import Atoms
    from ase.build import bulk

    out = []
    for k in range(n_cl):
        a = Atoms("Cu3Ni", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
        a.rattle(0.08, seed=seed0 + k)
        out.append(emt_structure(a, "cluster", k))
    for k in range(n_al):
        a = bulk("Al", "fcc", a=4.05).repeat((2, 1, 1))
        a.rattle(0.05, seed=seed0 + 50 + k)
        out.append(emt_structure(a, "al", k))
    return out


@pytest.fixture
def data(tmp_path):
    import yaml

    write_dataset(tmp_path / "train.h5", _emt(0))
    write_dataset(tmp_path / "test.h5", _emt(100, 4, 3))
    cfg = {"input": str(tmp_path / "train.h5"), "output": str(tmp_path / "aug.h5"), "copies": 3,
           "delta": 0.02, "seed": 1, "gpr": {"fingerprint": "local", "fit_iterations": 8, "fit_restarts": 1}}
    (tmp_path / "aug.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_gpr_test_save_predict_and_augment_reuses_the_fit(data, capsys):
    from distmlip.gpr.cli import predict_structures
    from distmlip.gpr.store import fit_path, load_fit

    assert cli_main(["gpr", "test", str(data / "aug.yaml"), str(data / "test.h5"), "--save", str(data / "fits"),
                     "--json", str(data / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "E MAE eV" in out and "2 sig" in out and "calib" in out
    res = json.loads((data / "t.json").read_text())
    ds = H5Dataset(data / "test.h5")
    assert {r["subset"] for r in res["subsets"]} == {t["name"] for t in ds.subsets}
    for r in res["subsets"]:
        sid = [t["name"] for t in ds.subsets].index(r["subset"])
        S = ds.read(np.flatnonzero(ds.subset_ids == sid))
        fit = load_fit(fit_path(data / "fits", r["subset"]), S[0].numbers)
        e, f, s = predict_structures(fit, S)
        err = e - np.array([x.energy for x in S])
        # the table is the saved fit's errors against the held-out labels
        assert r["E_mae_eV"] == pytest.approx(np.abs(err).mean(), rel=1e-10)
        assert r["F_mae_eVA"] == pytest.approx(np.abs(f - np.stack([x.forces for x in S])).mean(), rel=1e-10)
        assert r["within_2sigma"] == pytest.approx(np.mean(np.abs(err) <= 2 * s))
        # the table's sigma is the predictive one, calibrated on every training structure's
        # LOO error: c sqrt(latent var + energy noise^2)
        m = fit["model"].models[0]
        assert m.info["sigma_calibration_from"] == "all"
        Xf, Jf = fit["fingerprint"].compute([x.positions for x in S], list(S), with_jacobian=False)
        _, _, s_lat = fit["model"].predict(Xf, None if Jf is None else Jf, forces=False)
        ne = m.info["noise_energy_eV"]
        # (the latent variance w^2 - |L^-1 k|^2 cancels: the two predictions, with and without
        # force columns, contract k in different orders and agree to ~1e-13 eV^2)
        np.testing.assert_allclose(s ** 2, m.sigma_calibration ** 2 * (s_lat.numpy() ** 2 + ne ** 2), rtol=1e-8,
                                   atol=1e-12)
        assert r["sigma_calibration"] == pytest.approx(m.sigma_calibration, rel=1e-12)
        # and it has learnt something: errors far below the spread of the test energies
        assert r["E_mae_eV"] < 0.5 * np.std([x.energy for x in S])
    # predict writes the same numbers for every structure
    assert cli_main(["gpr", "predict", str(data / "fits"), str(data / "test.h5"), "-o", str(data / "p.npz")]) == 0
    z = np.load(data / "p.npz")
    assert np.isfinite(z["energy"]).all() and np.isfinite(z["sigma"]).all()
    allS = ds.read(np.arange(ds.n_structures))
    assert np.abs(z["energy"] - np.array([x.energy for x in allS])).mean() == pytest.approx(
        np.mean([r["E_mae_eV"] * r["n"] for r in res["subsets"]]) * len(res["subsets"]) / ds.n_structures, rel=1e-8)
    # augment with the saved fits gives the labels of augment with its own fit (same objects)
    assert cli_main(["augment", str(data / "aug.yaml"), "--set", f"gpr.load={data / 'fits'}",
                     "--set", f"output={data / 'aug_load.h5'}"]) == 0
    assert cli_main(["augment", str(data / "aug.yaml")]) == 0
    capsys.readouterr()
    a, b = H5Dataset(data / "aug_load.h5"), H5Dataset(data / "aug.h5")
    Sa, Sb = a.read(np.arange(a.n_structures)), b.read(np.arange(b.n_structures))
    assert len(Sa) == len(Sb) > ds.n_structures
    np.testing.assert_allclose([x.energy for x in Sa], [x.energy for x in Sb], rtol=0, atol=1e-9)
    rep = json.loads((data / "aug_load.report.json").read_text())
    assert all(r.get("gpr_loaded_from") for r in rep["subsets"])


def test_a_missing_or_empty_load_folder_is_an_error_not_a_refit_of_everything(data, capsys):
    """gpr.load (augment) and --load (gpr test) on a folder that does not exist or holds no fits:
    each subset warned and was fitted anew, minutes to hours, before an error named the folder."""
    (data / "empty").mkdir()
    for folder, what in (("nofits", "is not a folder"), ("empty", "holds no saved fits")):
        assert cli_main(["augment", str(data / "aug.yaml"), "--set", f"gpr.load={data / folder}"]) == 2
        assert cli_main(["gpr", "test", str(data / "aug.yaml"), str(data / "test.h5"), "--load",
                         str(data / folder)]) == 2
        err = capsys.readouterr().err
        assert err.count(f"gpr.load: {data / folder} {what}") == 2 and "fitting it" not in err, err
    assert not (data / "aug.h5").exists()


def test_augment_refuses_a_saved_fit_of_other_structures_and_keys_shards_by_its_content(data, capsys):
    """gpr.load on a subset whose training structures are not those the fit saw is an error naming
    the file and subset (its labels would not reproduce the references); a fit saved again into
    the same directory is another input for the augment shards."""
    from distmlip.config import load_config
    from distmlip.gpr.augment import AugmentConfig, _subset_key

    assert cli_main(["gpr", "fit", str(data / "aug.yaml"), "--out", str(data / "fits")]) == 0
    cfg = load_config(data / "aug.yaml", AugmentConfig)
    cfg.gpr.load = str(data / "fits")
    k1 = _subset_key(cfg, "Cu3Ni_0", np.arange(5), "c")
    # another data set with the same subsets (other rattles): refused
    write_dataset(data / "other.h5", _emt(7))
    capsys.readouterr()
    assert cli_main(["augment", str(data / "aug.yaml"), "--set", f"gpr.load={data / 'fits'}",
                     "--set", f"input={data / 'other.h5'}", "--set", f"output={data / 'o.h5'}"]) != 0
    import re
    assert re.search(r"Cu3Ni_0.gpr.pt: the saved GPR of subset 'Cu3Ni_0' was fitted on 5 structures .*other.h5",
                     capsys.readouterr().err)
    assert not (data / "o.h5").exists()
    # a saved fit of another fingerprint than the configuration names: refused (sweep 8: a
    # Cartesian fit labelled a 'fingerprint: local' run 64 meV off, exit 0)
    assert cli_main(["augment", str(data / "aug.yaml"), "--set", f"gpr.load={data / 'fits'}",
                     "--set", "gpr.fingerprint=cartesian", "--set", f"output={data / 'o2.h5'}"]) == 2
    assert "uses the 'local' fingerprint, the configuration asks for gpr.fingerprint: 'cartesian'" in \
        capsys.readouterr().err
    # refit (other seed, so other hyperparameters) into the same directory: another shard key
    assert cli_main(["gpr", "fit", str(data / "aug.yaml"), "--out", str(data / "fits"), "--set",
                     "gpr.fit_iterations=3"]) == 0
    assert _subset_key(cfg, "Cu3Ni_0", np.arange(5), "c") != k1
    # gpr test: a test subset without a fit is named, not dropped silently; none matching: error
    from ase.build import bulk
    ag = [emt_structure(bulk("Ag", "fcc", a=4.1).repeat((2, 1, 1)), "ag", k) for k in range(2)]
    write_dataset(data / "mixed.h5", _emt(200, 2, 0) + ag)
    write_dataset(data / "ag.h5", ag)
    capsys.readouterr()
    assert cli_main(["gpr", "test", str(data / "aug.yaml"), str(data / "mixed.h5"), "--load", str(data / "fits")]) == 0
    res = capsys.readouterr()
    assert "Cu3Ni_0" in res.out and "1 subset(s) of" in res.err and "Ag2_0" in res.err
    assert cli_main(["gpr", "test", str(data / "aug.yaml"), str(data / "ag.h5"), "--load", str(data / "fits")]) == 2
    assert "none of its subsets (Ag2_0) has a GPR fit" in capsys.readouterr().err


def test_copies_labelled_in_chunks_equal_one_prediction_and_show_progress(data, capsys):
    """augment labels a subset's copies in chunks of parents (bounded memory, progress with an
    ETA); the labels must equal one prediction of all copies at once."""
    from distmlip.gpr.augment import _label_copies
    from distmlip.gpr.store import fit_path, load_fit

    assert cli_main(["gpr", "fit", str(data / "aug.yaml"), "--out", str(data / "fits")]) == 0
    ds = H5Dataset(data / "train.h5")
    sid = [t["name"] for t in ds.subsets].index("Cu3Ni_0")
    S = ds.read(np.flatnonzero(ds.subset_ids == sid))
    fit = load_fit(fit_path(data / "fits", "Cu3Ni_0"), S[0].numbers)
    fp, model = fit["fingerprint"], fit["model"]
    M, nat = 3, S[0].natoms
    rng = np.random.default_rng(0)
    pos = np.stack([s.positions for s in S])[:, None] + rng.normal(0, 0.02, (len(S), M, nat, 3))
    capsys.readouterr()
    e, sd = _label_copies(fp, model, S, pos, M, "cluster (local)", 0, every_s=0.0)
    out = capsys.readouterr().out
    assert "labels of" in out and "ETA" in out            # one line per chunk but the last
    Xs, _ = fp.compute(list(pos.reshape(-1, nat, 3)), [s for s in S for _ in range(M)], with_jacobian=False)
    e1, _, s1 = model.predict(Xs, None, forces=False, variance=True, clusters=np.repeat(model.labels, M))
    # equal up to the BLAS blocking of k_*^T alpha, whose terms cancel (test_augment.py)
    np.testing.assert_allclose(e, e1.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sd, s1.numpy(), rtol=0, atol=1e-6)
    assert np.ptp(e) > 0


def test_inplace_lapack_helpers_match_torch():
    from distmlip.gpr.model import Workspace, potrf_inplace, potri_inplace, potrs, symmetrize_lower_, zero_upper_

    rng = np.random.default_rng(0)
    A = rng.normal(size=(37, 37))
    K = torch.as_tensor(A @ A.T + 37 * np.eye(37))
    ws = Workspace()
    L = ws.get("L", 37, "cpu")
    L.copy_(K)
    ptr = L.data_ptr()
    assert potrf_inplace(L) == 0 and L.data_ptr() == ptr
    Lt = torch.linalg.cholesky(K)
    torch.testing.assert_close(torch.tril(L), Lt)
    y = torch.as_tensor(rng.normal(size=(37, 2)))
    torch.testing.assert_close(potrs(L, y), torch.linalg.solve(K, y))
    assert potri_inplace(L) == 0
    torch.testing.assert_close(L, torch.linalg.inv(K))
    # a smaller request reuses the same storage
    assert ws.get("L", 20, "cpu").data_ptr() == ptr
    B = torch.as_tensor(rng.normal(size=(9, 9)))
    S = symmetrize_lower_(B.clone(), block=4)
    torch.testing.assert_close(S, torch.tril(B) + torch.tril(B, -1).T)
    torch.testing.assert_close(zero_upper_(B.clone(), block=4), torch.tril(B))
    # not positive definite: info > 0, no exception
    M = ws.get("M", 3, "cpu")
    M.copy_(torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert potrf_inplace(M) > 0


def test_gpr_test_and_predict_match_fits_by_atom_sequence(tmp_path, capsys):
    """convert names subsets per file in the order it meets them, so a test file's 'Cu3Ni_0' can
    be the training file's 'Cu3Ni_1' (another atom order): gpr test and predict take the fit of
    the same atom sequence, not the same name."""
    import yaml
    from ase import Atoms

    def cl(order, k):
        a = Atoms(order, positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
        a.rattle(0.08, seed=k)
        return emt_structure(a, order, k)

    write_dataset(tmp_path / "train.h5", [cl("Cu3Ni", k) for k in range(5)] + [cl("NiCu3", 10 + k) for k in range(5)])
    write_dataset(tmp_path / "test.h5", [cl("NiCu3", 30 + k) for k in range(3)])      # named Cu3Ni_0 there
    cfg = {"input": str(tmp_path / "train.h5"), "output": "-", "gpr": {"fingerprint": "cartesian",
                                                                      "fit_iterations": 8, "fit_restarts": 1}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    assert H5Dataset(tmp_path / "test.h5").subsets[0]["name"] == "Cu3Ni_0"
    assert cli_main(["gpr", "test", str(tmp_path / "a.yaml"), str(tmp_path / "test.h5"), "--save",
                     str(tmp_path / "fits"), "--json", str(tmp_path / "t.json")]) == 0
    r = json.loads((tmp_path / "t.json").read_text())["subsets"]
    assert [(x["subset"], x["fit"]) for x in r] == [("Cu3Ni_0", "Cu3Ni_1")]
    assert "the fit of training subset Cu3Ni_1" in capsys.readouterr().out
    assert cli_main(["gpr", "predict", str(tmp_path / "fits"), str(tmp_path / "test.h5"), "-o",
                     str(tmp_path / "p.npz")]) == 0
    assert "(fit Cu3Ni_1.gpr.pt)" in capsys.readouterr().out
    E = np.array([s.energy for s in H5Dataset(tmp_path / "test.h5").read(range(3))])
    assert np.abs(np.load(tmp_path / "p.npz")["energy"] - E).mean() == pytest.approx(r[0]["E_mae_eV"], rel=1e-10)


def test_gpr_test_scores_forces_of_the_structures_that_have_them_and_predict_refuses_no_match(data, capsys):
    """One test structure without forces dropped its subset's force error from `gpr test`; `gpr
    predict` with no matching fit wrote a file of NaN and exited 0 (sweep 8)."""
    from ase.build import bulk

    test = _emt(100, 4, 3)
    test[1].forces = None
    write_dataset(data / "mixed.h5", test)
    assert cli_main(["gpr", "fit", str(data / "aug.yaml"), "--out", str(data / "fits")]) == 0
    assert cli_main(["gpr", "test", str(data / "aug.yaml"), str(data / "mixed.h5"), "--load", str(data / "fits"),
                     "--json", str(data / "t.json")]) == 0
    res = json.loads((data / "t.json").read_text())
    cl = [r for r in res["subsets"] if r["n"] == 4][0]
    assert cl["F_mae_eVA"] is not None and cl["n_with_forces"] == 3 and res["total"]["F_mae_eVA"] is not None
    ag = [emt_structure(bulk("Ag", "fcc", a=4.1).repeat((2, 1, 1)), "ag", k) for k in range(2)]
    write_dataset(data / "ag.h5", ag)
    capsys.readouterr()
    assert cli_main(["gpr", "predict", str(data / "fits"), str(data / "ag.h5"), "-o", str(data / "p.npz")]) == 2
    assert "none of its subsets has a saved fit" in capsys.readouterr().err and not (data / "p.npz").exists()


def test_format_test_marks_an_uncalibrated_sigma():
    """A fit of fewer than 5 structures has no calibration factor: the table shows '-' and says
    why, not a factor 1.00 under a header that calls the sigmas calibrated (sweep 12)."""
    from distmlip.gpr.cli import format_test

    row = dict(subset="Cu102", fit="Cu102", n=4, fingerprint="local", E_mae_eV=0.005, E_bias_eV=-0.005,
               F_mae_eVA=0.004, sigma_mean_eV=0.004, within_1sigma=0.5, within_2sigma=1.0, sigma_calibration=1.0)
    ok = format_test({"subsets": [dict(row, sigma_calibrated=True)], "total": None})
    assert "1.00" in ok.splitlines()[-1] and "calib -" not in ok
    bad = format_test({"subsets": [dict(row, sigma_calibrated=False)], "total": None})
    assert "calib -: fewer than 5 training structures" in bad
    assert not bad.splitlines()[3].rstrip().endswith("1.00")


def test_gpr_fit_test_predict_work_in_augments_groups(tmp_path, capsys):
    """Random Cu-Au cells, each its own composition: `gpr fit` fits augment's one group (saved
    under its first subset), and `gpr test` / `predict` give held-out cells of new compositions
    and atom orders to that fit, forces in each structure's own atom order (checked against EMT:
    a wrong permutation scores like a random force field)."""
    import yaml
    from ase.build import bulk

    def cells(n, seed):
        rng = np.random.default_rng(seed)
        out = []
        for k in range(n):
            a = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 1, 1))
            a.symbols[rng.choice(8, int(rng.integers(1, 7)), replace=False)] = "Au"
            a.rattle(0.06, seed=seed * 100 + k)
            out.append(emt_structure(a, f"c{seed}", k))
        return out

    write_dataset(tmp_path / "train.h5", cells(12, 1))
    write_dataset(tmp_path / "test.h5", cells(5, 2))
    cfg = {"input": str(tmp_path / "train.h5"), "output": "-",
           "gpr": {"fingerprint": "local", "fit_iterations": 15, "fit_restarts": 1}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["gpr", "fit", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "fits")]) == 0
    out = capsys.readouterr().out
    assert "compositions of AuCu with 8 atoms: one GPR" in out
    # its leave-one-out errors cross compositions, and the line says so
    assert re.search(r"LOO energy MAE [0-9.]+ eV over all 12 structures \(a group of \d compositions in 12 "
                     r"structures: each left out is predicted across compositions", out), out
    assert len(list((tmp_path / "fits").glob("*.gpr.pt"))) == 1
    assert cli_main(["gpr", "test", str(tmp_path / "a.yaml"), str(tmp_path / "test.h5"), "--load",
                     str(tmp_path / "fits"), "--json", str(tmp_path / "t.json")]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    test = H5Dataset(tmp_path / "test.h5")
    assert sum(r["n"] for r in res["subsets"]) == test.n_structures     # every test cell has its fit
    F = np.concatenate([np.abs(s.forces).ravel() for s in test.read(range(test.n_structures))])
    assert res["total"]["F_mae_eVA"] < 0.35 * F.mean(), (res["total"]["F_mae_eVA"], F.mean())
    assert cli_main(["gpr", "predict", str(tmp_path / "fits"), str(tmp_path / "test.h5"), "-o",
                     str(tmp_path / "p.npz")]) == 0
    p = np.load(tmp_path / "p.npz")
    S = test.read(range(test.n_structures))
    E = np.array([s.energy for s in S])
    assert np.abs(p["energy"] - E).mean() == pytest.approx(res["total"]["E_mae_eV"], rel=1e-9)
    Fp = np.concatenate([p["forces"][p["forces_offset"][i]:p["forces_offset"][i + 1]] for i in range(len(S))])
    assert np.abs(Fp - np.concatenate([s.forces.ravel() for s in S])).mean() == pytest.approx(
        res["total"]["F_mae_eVA"], rel=1e-9)


def test_a_local_fit_takes_its_composition_in_another_atom_order(tmp_path, capsys):
    """A local-kernel fit compares atoms of one element, so a test subset of the same composition
    in another atom order takes it (before: no fit, the subset left out): its atoms re-ordered
    element by element for the fit, its forces given back in its own order (against EMT)."""
    import yaml
    from ase import Atoms

    def cl(order, k):
        a = Atoms(order, positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
        a.rattle(0.1, seed=k)
        return emt_structure(a, order, k)

    write_dataset(tmp_path / "train.h5", [cl("Cu3Ni", k) for k in range(8)])
    write_dataset(tmp_path / "test.h5", [cl("NiCu3", 40 + k) for k in range(4)])
    cfg = {"input": str(tmp_path / "train.h5"), "output": "-",
           "gpr": {"fingerprint": "local", "fit_iterations": 15, "fit_restarts": 1}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["gpr", "test", str(tmp_path / "a.yaml"), str(tmp_path / "test.h5"), "--json",
                     str(tmp_path / "t.json")]) == 0
    r = json.loads((tmp_path / "t.json").read_text())["subsets"]
    assert [(x["subset"], x["fit"], x["n"]) for x in r] == [("Cu3Ni_0", "Cu3Ni_0", 4)]
    S = H5Dataset(tmp_path / "test.h5").read(range(4))
    assert list(S[0].numbers) == [28, 29, 29, 29]
    F = np.abs(np.concatenate([s.forces.ravel() for s in S])).mean()
    assert r[0]["F_mae_eVA"] < 0.1 * F, (r[0]["F_mae_eVA"], F)
