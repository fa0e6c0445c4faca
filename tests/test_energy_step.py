"""The engine-free energy step (training/energy_step.py) against the autograd step it replaces:
the same loss and the same weight gradient on batches of cached descriptors, with and without
the copy-difference term, with ZBL's frozen energies, with float32 networks and with the loss
form 'rmse'; the trainer takes it where it applies; bootstrap weights of kept feature batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_difference_loss import augmented_emt


@pytest.fixture(scope="module")
def aug(tmp_path_factory):
    p = tmp_path_factory.mktemp("estep") / "aug.h5"
    augmented_emt(p)
    return p


def _trainer(tmp_path, h5, *, training=None, model=None, zbl=None):
    import yaml

    from distmlip.training.config import load_train_config
    from distmlip.training.trainer import Trainer

    t = dict(mode="energy", epochs=1, batch_atoms=60, lr=0.01, output=str(tmp_path / "run"), progress_bar="off",
             seed=3)
    t.update(training or {})
    cfg = {"data": {"train": [str(h5)], "fractions": [0.7, 0.3, 0.0], "prefetch": False},
           "descriptor": {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2, "cache": "on",
                          "cache_file": str(tmp_path / "desc.h5")},
           "model": {"hidden": [6, 5], **(model or {})}, "training": t}
    if zbl is not None:
        cfg["zbl"] = zbl
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True)


def _both(tr, idx):
    """(engine-free (loss, grad, E sums), autograd (loss, grad, E sums)) of the batch ``idx``."""
    from distmlip.training import energy_step

    batch = tr.collate(tr.ds.read(idx), tr.ds)
    assert energy_step.applies(tr.model, tr.flat, batch), "the engine-free path was not taken"
    counts = tr.counts_of(idx)
    out = []
    for engine_free in (True, False):
        acc = torch.zeros(32, dtype=torch.float64)
        tr.flat.zero_grad()
        if engine_free:
            loss = tr._energy_step(batch, counts, acc)
        else:
            with tr.flat.routing():
                loss = tr.batch_loss(batch, counts, acc)
                loss.backward(inputs=tr.flat.grad_inputs)
        tr.flat.sync()
        out.append((float(loss.detach()), tr.flat.tensors[0].grad.clone(), acc.clone(), tr._step_sums))
        tr._step_sums = None
    return out


def _close(a, b, rtol):
    (la, ga, aa, sa), (lb, gb, ab, sb) = a, b
    assert la > 0 and abs(la - lb) <= rtol * abs(lb)
    assert float(gb.abs().max()) > 0
    assert torch.allclose(ga, gb, rtol=rtol, atol=rtol * float(gb.abs().max()))
    assert torch.allclose(aa, ab, rtol=1e-12, atol=1e-15)
    assert (sa is None) == (sb is None)
    if sa is not None:
        assert torch.allclose(sa, sb, rtol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_engine_free_step_equals_autograd_step(tmp_path, aug, gamma):
    tr = _trainer(tmp_path, aug, training={"difference_weight": gamma})
    idx = np.sort(tr.train_idx)
    for part in (idx, idx[::3]):
        a, b = _both(tr, part)
        _close(a, b, 1e-12)
        if gamma > 0:
            assert float(a[2][:].abs().sum()) > 0


def test_engine_free_step_with_zbl_float32_and_rmse_form(tmp_path, aug):
    # ZBL radii wide enough that every 4-atom cluster has pairs inside them: frozen energies
    zbl = {"enabled": True, "radii": {"Cu-Cu": [2.3, 2.6]}}
    tr = _trainer(tmp_path / "zbl", aug, zbl=zbl)
    batch = tr.collate(tr.ds.read(np.sort(tr.train_idx)), tr.ds)
    assert len(tr.model.terms) == 2
    assert float(tr.model.terms[1].atomic_energies(batch).abs().max()) > 0, "no ZBL energy: the test would not see it"
    a, b = _both(tr, np.sort(tr.train_idx))
    _close(a, b, 1e-12)
    tr = _trainer(tmp_path / "f32", aug, model={"dtype": "float32"})
    a, b = _both(tr, np.sort(tr.train_idx))
    _close(a, b, 1e-5)
    tr = _trainer(tmp_path / "rmse", aug, training={"loss": "rmse", "difference_weight": 0.0})
    tr._prev_rmse = (0.01, 1.0, 1.0)
    a, b = _both(tr, np.sort(tr.train_idx))
    _close(a, b, 1e-12)


def test_validation_energies_equal_the_model_and_follow_a_refit(tmp_path, aug):
    """energy_step.energies (validation) equals model(batch), also after an in-place change and a
    replacement of the normalisation (a refit)."""
    from distmlip.training import energy_step

    tr = _trainer(tmp_path, aug)
    batch = tr.collate(tr.ds.read(np.sort(tr.val_idx)), tr.ds)
    assert energy_step.forward_applies(tr.model, batch)
    with torch.no_grad():
        assert torch.allclose(energy_step.energies(tr.model, batch), tr.model(batch), rtol=1e-14, atol=0)
        before = energy_step.energies(tr.model, batch)
        tr.model.ann.feature_mean.add_(0.05)
        after = energy_step.energies(tr.model, batch)
        assert float((after - before).abs().max()) > 1e-6
        assert torch.allclose(after, tr.model(batch), rtol=1e-14, atol=0)
        # replaced (a new tensor, version 0 like the first): seen as well
        tr.model.ann.feature_std = tr.model.ann.feature_std * 1.5
        assert torch.allclose(energy_step.energies(tr.model, batch), tr.model(batch), rtol=1e-14, atol=0)


def test_trainer_takes_the_engine_free_path(tmp_path, aug, monkeypatch):
    from distmlip.training import energy_step

    calls = []
    real = energy_step.energy_loss_and_gradients

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(energy_step, "energy_loss_and_gradients", counting)
    tr = _trainer(tmp_path, aug, training={"difference_weight": 0.3})
    tr.fit()
    assert len(calls) == tr.timers["steps"] > 0


def test_bootstrap_weights_of_kept_feature_batches_do_not_compound(tmp_path, aug):
    """A committee member's bootstrap multiplicities weigh the loader's kept batches once: they
    come back every epoch, and multiplying their weights in place gave 2**epoch."""
    tr = _trainer(tmp_path, aug)
    assert tr.stream.fixed_batches
    tr.sample_multiplier = np.where(np.arange(tr.ds.n_structures) % 2 == 0, 2.0, 0.0)
    b = tr.stream.batches(0, 0)[0]
    item = tr.stream.loader(b)
    want = item.weight * torch.as_tensor(tr.sample_multiplier[item.index.numpy()])
    for _ in range(3):
        again = tr.stream.loader(b)
        assert again is item                      # the kept batch itself
        assert torch.equal(tr.collate(again).weight, want)
