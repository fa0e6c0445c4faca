"""Refitting the normalisation of a trained model on new data while keeping its energies and
forces (what explore does before each warm start): the buffers change, the function does not."""
import numpy as np
import pytest
import torch

from distmlip.data.examples import rattled_cu_au
from distmlip.descriptors.batch import collate
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2, "backend": "reference"}


@pytest.mark.parametrize("hidden,dtype,zbl", [([6, 5], "float64", None), ([], "float64", {}), ([4], "float32", {})])
def test_refit_keeps_energies_and_forces(hidden, dtype, zbl):
    torch.manual_seed(0)
    old = rattled_cu_au(8, seed=1)
    new = rattled_cu_au(8, seed=2)
    for s in new:                      # new data: hotter and higher in energy than the old
        s.positions = s.positions + np.random.default_rng(3).normal(0, 0.2, s.positions.shape)
        s.energy = s.energy + 0.5 * len(s.numbers)
    m = BPNN(["Cu", "Au"], DESC, hidden, "tanh", dtype, zbl=zbl)
    m.fit_normalization([collate(old, m.species, cutoff=m.cutoff)])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    probe = collate(new + old[:2], m.species, cutoff=m.cutoff)
    E0, F0 = m.energy_and_forces(probe)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    summ = m.refit_normalization_keeping_function([collate(new, m.species, cutoff=m.cutoff)])
    assert summ["kept_function"] and summ["n_structures"] == 8
    after = m.state_dict()
    for k in ("ann.feature_mean", "ann.feature_std", "ann.energy_shift", "ann.energy_scale"):
        assert not torch.equal(before[k], after[k]), k       # the normalisation did change
    probe = collate(new + old[:2], m.species, cutoff=m.cutoff)
    E1, F1 = m.energy_and_forces(probe)
    tol = 1e-9 if dtype == "float64" else 2e-3
    torch.testing.assert_close(E1, E0, rtol=0, atol=tol * 20)
    torch.testing.assert_close(F1, F0, rtol=0, atol=tol * 20)
    # and a plain refit (what a warm start with refit_normalization does) would not keep them
    m2 = BPNN(["Cu", "Au"], DESC, hidden, "tanh", dtype, zbl=zbl)
    m2.load_state_dict(before)
    m2.fit_normalization([collate(new, m.species, cutoff=m.cutoff)])
    E2, _ = m2.energy_and_forces(collate(new + old[:2], m.species, cutoff=m.cutoff))
    assert float((E2 - E0).abs().max()) > 0.1
