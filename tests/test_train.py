"""Trainer: loss decreases on EMT data, resume is bit-for-bit (2+2 == 4 epochs, and mid-epoch
stop), force-mode weight gradient = finite difference of the loss, the global-count loss of a
batch split in two shares equals the union batch, config errors."""
import numpy as np
import pytest
import torch

from distmlip.data.examples import rattled_cu_au
from distmlip.errors import ConfigError
from distmlip.training.config import load_train_config
from distmlip.training.losses import force_selection, local_counts
from distmlip.training.trainer import Trainer
from helpers import distmlip_cli


def make_cfg(tmp_path, h5, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [6, 6]}}
training: {{epochs: 4, batch_atoms: 16, lr: 0.01, output: {tmp_path / 'run'}, progress_bar: 'off'}}
""")
    return load_train_config(yaml, over)


def weights(path):
    return torch.load(path, weights_only=True)


def test_training_reduces_loss(tmp_path, emt_h5):
    cfg = make_cfg(tmp_path, emt_h5, **{"training.epochs": 6, "training.lr": 0.02})
    tr = Trainer(cfg, quiet=True)
    before = tr.evaluate_stream(tr.stream)["loss"]
    assert tr.fit() == "done"
    after = tr.evaluate_stream(tr.stream)["loss"]
    assert after < 0.5 * before, (before, after)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch,")
    for f in ("model.pt", "best_model.pt", "last_model.pt", "checkpoint.pt", "config.yaml"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.parametrize("mode", ["energy", "force"])
def test_resume_two_plus_two_equals_four(tmp_path, emt_h5, mode):
    over = {"training.mode": mode, "training.force_fraction": 0.5, "training.alpha": 0.3}
    full = make_cfg(tmp_path / "a", emt_h5, **over)
    Trainer(full, quiet=True).fit()
    half = make_cfg(tmp_path / "b", emt_h5, **over, **{"training.epochs": 2})
    Trainer(half, quiet=True).fit()
    again = make_cfg(tmp_path / "b", emt_h5, **over)
    Trainer(again, resume=str(tmp_path / "b" / "run" / "checkpoint.pt"), quiet=True).fit()
    wa = weights(tmp_path / "a" / "run" / "last_model.pt")["state_dict"]
    wb = weights(tmp_path / "b" / "run" / "last_model.pt")["state_dict"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ca = weights(tmp_path / "a" / "run" / "checkpoint.pt")
    cb = weights(tmp_path / "b" / "run" / "checkpoint.pt")
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])
    la = (tmp_path / "a" / "run" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "run" / "log.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731  (drop the time column)
    assert strip(la) == strip(lb)


def test_extending_a_finished_cosine_run_trains_on(tmp_path, emt_h5):
    """A cosine run resumed with more epochs after its schedule ended continues on the cosine over
    the new epoch count (it stayed at min_lr, and the added epochs learnt nothing), and ends where
    a run planned that long ends (the same rates, to rounding)."""
    import csv
    import math

    over = {"training.scheduler": "cosine", "training.min_lr": 1e-6, "training.lr": 0.01}
    Trainer(make_cfg(tmp_path / "a", emt_h5, **over, **{"training.epochs": 6}), quiet=True).fit()
    Trainer(make_cfg(tmp_path / "b", emt_h5, **over, **{"training.epochs": 3}), quiet=True).fit()
    Trainer(make_cfg(tmp_path / "b", emt_h5, **over, **{"training.epochs": 6}),
            resume=str(tmp_path / "b" / "run" / "checkpoint.pt"), quiet=True).fit()
    lr = lambda d: [float(r["lr"]) for r in csv.DictReader(open(tmp_path / d / "run" / "log.csv"))]  # noqa: E731
    la, lb = lr("a"), lr("b")
    assert len(la) == len(lb) == 6
    want = [1e-6 + (0.01 - 1e-6) * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    assert lb[3] > 0.4 * 0.01                     # not min_lr: the added epochs learn
    for a, b, w in zip(la[3:], lb[3:], want[3:]):
        assert a == pytest.approx(w, rel=1e-5) and b == pytest.approx(w, rel=1e-5)


def test_resume_with_another_loss_schedule_or_a_damaged_best_model(tmp_path, emt_h5, capsys):
    """Sweep 13's resumes: a changed loss weight starts the best loss and the plateau count afresh
    (the old best on the old scale froze model.pt and halved the rate every patience); plateau
    switched to cosine continues on the cosine at the resumed epoch (it restarted there and
    ended far above min_lr); a damaged best_model.pt is an error naming it (it became an
    unreadable model.pt with exit 0); a missing one is tracked afresh."""
    import csv
    import math
    import shutil

    from distmlip.errors import DataFormatError

    over = {"training.mode": "force", "training.alpha": 0.3, "training.min_lr": 1e-6}
    Trainer(make_cfg(tmp_path / "a", emt_h5, **over, **{"training.epochs": 3}), quiet=True).fit()
    ck = tmp_path / "a" / "run" / "checkpoint.pt"
    shutil.copytree(tmp_path / "a", tmp_path / "keep")
    best_before = float(torch.load(ck, weights_only=False)["best"])
    tr = Trainer(make_cfg(tmp_path / "a", emt_h5, **{**over, "training.epochs": 4, "training.alpha": 0.9}),
                 resume=str(ck), quiet=True)
    assert tr.best == float("inf") and tr.bad_epochs == 0 and math.isfinite(best_before)
    assert tr.sched.best == tr.sched.mode_worse
    # plateau -> cosine at epoch 3 of 6: the cosine's rates from there on, ending at min_lr
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "keep", tmp_path / "b")
    Trainer(make_cfg(tmp_path / "b", emt_h5, **over, **{"training.epochs": 6, "training.scheduler": "cosine"}),
            resume=str(tmp_path / "b" / "run" / "checkpoint.pt"), quiet=True).fit()
    lr = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "b" / "run" / "log.csv"))]
    want = [1e-6 + (0.01 - 1e-6) * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    for got, w in zip(lr[3:], want[3:]):
        assert got == pytest.approx(w, rel=1e-5)
    # a damaged best model: refused by name; removed: tracked afresh, and model.pt is readable
    shutil.copytree(tmp_path / "keep", tmp_path / "c")
    best = tmp_path / "c" / "run" / "best_model.pt"
    best.write_bytes(best.read_bytes()[:200])
    cfg = make_cfg(tmp_path / "c", emt_h5, **over, **{"training.epochs": 4})
    with pytest.raises(DataFormatError, match="best_model.pt: cannot read best model.*best model of the run being resumed"):
        Trainer(cfg, resume=str(tmp_path / "c" / "run" / "checkpoint.pt"), quiet=True)
    best.unlink()
    tr = Trainer(cfg, resume=str(tmp_path / "c" / "run" / "checkpoint.pt"), quiet=True)
    assert tr.best == float("inf")
    tr.fit()
    torch.load(tmp_path / "c" / "run" / "model.pt", weights_only=False)


def test_stop_mid_epoch_and_resume(tmp_path, emt_h5):
    full = make_cfg(tmp_path / "a", emt_h5, **{"training.epochs": 3})
    Trainer(full, quiet=True).fit()
    cfg = make_cfg(tmp_path / "b", emt_h5, **{"training.epochs": 3})
    tr = Trainer(cfg, quiet=True)
    steps = tr.stream.steps(0)
    stop_at = steps + 2  # inside epoch 2
    status = tr.fit(step_callback=lambda t: t.global_step == stop_at)
    assert status == "stopped"
    ck = weights(tmp_path / "b" / "run" / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["step"] == 2
    Trainer(cfg, resume=str(tmp_path / "b" / "run" / "checkpoint.pt"), quiet=True).fit()
    wa = weights(tmp_path / "a" / "run" / "last_model.pt")["state_dict"]
    wb = weights(tmp_path / "b" / "run" / "last_model.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("ema", [0.5, 0.0])
def test_kept_models_are_the_moving_average_where_it_validates_better(tmp_path, emt_h5, ema):
    """training.ema: the average follows the documented recursion over the raw weights after each
    step (decay min(ema, (1 + t) / (10 + t))); each validation scores it against the raw weights
    and the better is logged and written; the optimizer continues from the raw weights; ema 0
    keeps the raw weights."""
    cfg = make_cfg(tmp_path, emt_h5, **{"training.epochs": 3, "training.ema": ema})
    tr = Trainer(cfg, quiet=True)
    avg = [p.detach().clone() for p in tr.flat.tensors]
    raw = []

    def record(t):
        raw.append([p.detach().clone() for p in t.flat.tensors])
        return False

    assert tr.fit(step_callback=record) == "done"
    assert len(raw) == 3 * tr.stream.steps(0)
    for t, w in enumerate(raw):
        d = min(ema, (1.0 + t) / (10.0 + t)) if ema > 0 else 0.0
        avg = [d * a + (1.0 - d) * x for a, x in zip(avg, w)]
    assert all(torch.equal(p, x) for p, x in zip(tr.flat.tensors, raw[-1]))   # the steps' own weights
    val_raw = tr.evaluate_stream(tr.val_stream)["loss"]
    if ema > 0:
        assert all(torch.allclose(a, e, rtol=0, atol=1e-12) for a, e in zip(avg, tr._ema))
        assert max(float((a - x).abs().max()) for a, x in zip(avg, raw[-1])) > 1e-6
    with torch.no_grad():
        for p, a in zip(tr.flat.tensors, avg):
            p.copy_(a)
    val_avg = tr.evaluate_stream(tr.val_stream)["loss"]
    chosen_avg = ema > 0 and not val_raw < val_avg
    assert tr._use_avg == chosen_avg
    if not chosen_avg:
        with torch.no_grad():
            for p, x in zip(tr.flat.tensors, raw[-1]):
                p.copy_(x)
    written = weights(tmp_path / "run" / "last_model.pt")["state_dict"]
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(written[k], v.cpu(), rtol=0, atol=1e-12, msg=k)
    logged = (tmp_path / "run" / "log.csv").read_text().splitlines()[-1].split(",")[8]
    assert float(logged) == pytest.approx(min(val_raw, val_avg) if ema > 0 else val_raw, rel=1e-6)


def test_the_average_is_kept_where_it_validates_better_and_not_where_it_lags(tmp_path, emt_h5):
    """Late in a run the average is chosen; at the first epoch of a fast-moving start the raw
    weights are (the average would lag them)."""
    tr = Trainer(make_cfg(tmp_path / "a", emt_h5, **{"training.epochs": 1, "training.ema": 0.999,
                                                     "training.lr": 0.05}), quiet=True)
    tr.fit()
    assert not tr._use_avg
    tr = Trainer(make_cfg(tmp_path / "b", emt_h5, **{"training.epochs": 40, "training.ema": 0.9}), quiet=True)
    tr.fit()
    assert tr._use_avg


def test_a_checkpoint_from_before_the_average_resumes_and_starts_one(tmp_path, emt_h5, capsys):
    """Checkpoints written before training.ema existed have no average: the resume starts one at
    the resumed weights and says so (the setting's change is named too)."""
    Trainer(make_cfg(tmp_path, emt_h5, **{"training.epochs": 2}), quiet=True).fit()
    ck = tmp_path / "run" / "checkpoint.pt"
    st = torch.load(ck, weights_only=False)
    assert st["ema"] is not None
    del st["ema"], st["config"]["training"]["ema"]
    torch.save(st, ck)
    tr = Trainer(make_cfg(tmp_path, emt_h5, **{"training.epochs": 3}), resume=str(ck))
    out = capsys.readouterr().out
    assert "no moving average of the weights" in out and "training.ema changed from 0.0 to 0.999" in out
    assert all(torch.equal(a, p) for a, p in zip(tr._ema, tr.flat.tensors))
    assert tr.fit() == "done"


def test_resume_refuses_replaced_training_data(tmp_path, emt_h5):
    """A checkpoint resumed after its training file was replaced at the same path (re-augmented,
    reconverted) is an error naming the file, not a silent continuation on other data."""
    import shutil

    from distmlip.data.h5store import write_dataset

    h5 = tmp_path / "d.h5"
    shutil.copy(emt_h5, h5)
    cfg = make_cfg(tmp_path / "b", h5, **{"training.epochs": 2})
    Trainer(cfg, quiet=True).fit()
    ck = str(tmp_path / "b" / "run" / "checkpoint.pt")
    assert set(weights(ck)["data"]) == {"train"}
    Trainer(make_cfg(tmp_path / "b", h5, **{"training.epochs": 3}), resume=ck, quiet=True).fit()  # same data: fine
    from distmlip.data.h5store import H5Dataset
    S = H5Dataset(h5).read(range(H5Dataset(h5).n_structures))
    write_dataset(h5, S[:-1])                                    # one structure fewer, same path
    with pytest.raises(ConfigError, match=r"the train data changed since this checkpoint was written: .*d\.h5"):
        Trainer(make_cfg(tmp_path / "b", h5, **{"training.epochs": 4}), resume=ck, quiet=True)


def _force_trainer(tmp_path, emt_h5):
    cfg = make_cfg(tmp_path, emt_h5, **{"training.mode": "force", "training.alpha": 0.4,
                                         "training.force_fraction": 0.5, "training.seed": 3})
    return Trainer(cfg, quiet=True)


def test_force_mode_weight_gradient_matches_finite_difference(tmp_path, emt_h5):
    tr = _force_trainer(tmp_path, emt_h5)
    structs = tr.ds.read(tr.train_idx[:4])
    batch = tr.collate(structs)
    sel = tr._selected(batch)
    # the selection is the seeded per-structure draw (force_fraction 0.5, seed 3)
    assert sel.tolist() == force_selection(batch.index.numpy(), 3, 0.5).tolist()
    counts = local_counts(batch, sel, True)

    def loss():
        b = tr.collate(structs)
        return tr.batch_loss(b, counts, selected=sel)

    tr.model.zero_grad()
    loss().backward()
    layer = tr.model.ann.nets[0][2]  # second hidden layer of Cu
    g = layer.weight.grad.clone()
    h = 1e-6
    for (r, c) in [(0, 0), (3, 2), (5, 5)]:
        with torch.no_grad():
            layer.weight[r, c] += h
        lp = loss().item()
        with torch.no_grad():
            layer.weight[r, c] -= 2 * h
        lm = loss().item()
        with torch.no_grad():
            layer.weight[r, c] += h
        fd = (lp - lm) / (2 * h)
        assert abs(fd - g[r, c].item()) < 1e-6 * max(abs(fd), 1e-3), (r, c, fd, g[r, c].item())


def test_global_count_loss_of_two_shares_equals_union(tmp_path, emt_h5):
    """What each MPI rank does: local loss with all-reduced (here: summed) counts, gradients summed."""
    tr = _force_trainer(tmp_path, emt_h5)
    structs = tr.ds.read(tr.train_idx[:5])
    params = list(tr.model.parameters())

    def grads(parts):
        batches = [tr.collate(p) for p in parts]
        sels = [tr._selected(b) for b in batches]
        counts = sum(local_counts(b, s, True) for b, s in zip(batches, sels))
        tr.model.zero_grad()
        total = 0.0
        for b, s in zip(batches, sels):
            loss = tr.batch_loss(b, counts, selected=s)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in params]

    l1, g1 = grads([structs])
    l2, g2 = grads([structs[:2], structs[2:]])
    assert abs(l1 - l2) < 1e-12 * abs(l1)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_force_selection_deterministic_fraction():
    idx = np.arange(20000)
    s1 = force_selection(idx, 7, 0.1)
    assert np.array_equal(s1, force_selection(idx, 7, 0.1))
    assert abs(s1.mean() - 0.1) < 0.01
    assert not np.array_equal(s1, force_selection(idx, 8, 0.1))
    assert force_selection(idx, 7, 1.0).all() and not force_selection(idx, 7, 0.0).any()


def test_config_typo_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [x.h5]}\ntraining: {epoch: 3}\n")
    with pytest.raises(ConfigError) as exc:
        load_train_config(p)
    msg = str(exc.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg and "batch_atoms" in msg


def test_cli_train_and_warm_start(tmp_path, emt_h5):
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{emt_h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{epochs: 1, batch_atoms: 40, output: {tmp_path / 'r1'}}}
""")
    res = distmlip_cli(["train", str(tmp_path / "c.yaml"), "--set", "training.lr=1e-2", "--set", "training.seed=1"])
    assert "epoch    1/1" in res.stdout and (tmp_path / "r1" / "model.pt").is_file()
    assert weights(tmp_path / "r1" / "checkpoint.pt")["config"]["training"]["lr"] == 0.01
    cfg = load_train_config(tmp_path / "c.yaml", {"training.warm_start": str(tmp_path / "r1" / "model.pt"),
                                                  "training.output": str(tmp_path / "r2"), "training.lr": 1e-4})
    tr = Trainer(cfg, quiet=True)
    a = weights(tmp_path / "r1" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], v) for k, v in tr.model.state_dict().items())  # starts from the file
    tr.fit()
    b = weights(tmp_path / "r2" / "model.pt")["state_dict"]
    assert torch.equal(a["ann.feature_mean"], b["ann.feature_mean"])  # normalisation kept
    assert not torch.equal(a["ann.nets.0.0.weight"], b["ann.nets.0.0.weight"])  # and trained on
    # a config whose architecture differs from the warm-start model's: the model's is kept, the
    # differences are named, and config.yaml records what the model is
    import yaml
    res = distmlip_cli(["train", str(tmp_path / "c.yaml"), "--set", f"training.warm_start={tmp_path / 'r1' / 'model.pt'}",
                        "--set", f"training.output={tmp_path / 'r3'}", "--set", "model.hidden=[7, 7]",
                        "--set", "descriptor.n_radial=5", "--set", "zbl.enabled=false"])
    assert ("these settings of the config differ and are ignored: descriptor.n_radial: 5 (model: 4); "
            "model.hidden: [7, 7] (model: [4]); zbl.enabled: False (model: True)") in res.stderr
    written = yaml.safe_load((tmp_path / "r3" / "config.yaml").read_text())
    # the fine-tuned model's training-data record covers the first run's data too
    from distmlip.models.bpnn import BPNN
    r1, r3 = BPNN.load(tmp_path / "r1" / "model.pt").training_record, BPNN.load(tmp_path / "r3" / "model.pt").training_record
    # (on the same data: counted once; it was doubled before sweep 7)
    assert r3["n_structures"] == r1["n_structures"] and r3["data"] == r1["data"] and \
        r3["pair_min_distance_A"] == r1["pair_min_distance_A"]
    assert written["model"]["hidden"] == [4] and written["descriptor"]["n_radial"] == 4 and written["zbl"]["enabled"]
    # that run resumes from its own config.yaml (which records the model's architecture, not the
    # config's as given: sweep 7 found it refused) and from the config as first given
    res = distmlip_cli(["train", str(tmp_path / "r3" / "config.yaml"), "--resume", "auto", "--set", "training.epochs=2"])
    assert "resumed from" in res.stdout + res.stderr, res.stderr
    # a warm start added on --resume of a run that was not one: refused (it only merged the record)
    res = distmlip_cli(["train", str(tmp_path / "c.yaml"), "--resume", "auto", "--set", "training.epochs=2",
                        "--set", f"training.warm_start={tmp_path / 'r1' / 'model.pt'}"], check=False)
    assert res.returncode == 2 and "not a fine-tuning (no training.warm_start)" in res.stderr, res.stderr


@pytest.mark.parametrize("per_atom", [True, False])
@pytest.mark.parametrize("force_counts", [True, False])
def test_energy_force_loss_matches_the_written_out_loss(per_atom, force_counts):
    """The trainer's loss node (the compiled operator and the torch operations) and the
    validation's sums against the loss written out with torch operations: value and gradients in
    E and F."""
    from distmlip.descriptors.batch import collate
    from distmlip.training import losses

    structs = rattled_cu_au(5, seed=3)
    b = collate(structs, species=["Cu", "Au"], cutoff=4.0)
    b.weight = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    sel = torch.tensor([True, False, True, True, False])
    mask = losses.force_atom_mask(b, sel)
    counts = losses.local_counts(b, sel, True) * 1.7           # as if other ranks had more
    if not force_counts:
        counts[1] = 0.0
    g = torch.Generator().manual_seed(0)
    E0 = b.energy + torch.randn(5, dtype=torch.float64, generator=g)
    F0 = b.forces + torch.randn(b.n_atoms, 3, dtype=torch.float64, generator=g)
    alpha = 0.3
    results = []
    for compiled in (True, False):
        E, F = E0.clone().requires_grad_(), F0.clone().requires_grad_()
        loss = losses.energy_force_loss(E, b, counts, per_atom=per_atom, alpha=alpha, F=F, mask=mask,
                                        compiled=compiled)
        (loss * 3.0).backward()
        results.append((loss.detach(), E.grad, F.grad))
    # written out
    E, F = E0.clone().requires_grad_(), F0.clone().requires_grad_()
    err = (E - b.energy) / (b.natoms.double() if per_atom else 1.0)
    L_E = (b.weight * err * err).sum() / counts[0]
    wa = b.weight[b.structure] * mask.double()
    L_F = ((wa[:, None] * (F - b.forces) ** 2).sum() / counts[1]) if force_counts else F.sum() * 0.0
    ref = (1 - alpha) * L_E + alpha * L_F
    (ref * 3.0).backward()
    for loss, gE, gF in results:
        assert torch.allclose(loss, ref.detach(), rtol=1e-13, atol=0)
        assert torch.allclose(gE, E.grad, rtol=1e-12, atol=1e-16)
        assert torch.allclose(gF, F.grad, rtol=1e-12, atol=1e-16)
    # the validation's form: sums over the batch, combined with the batch's own counts
    sums = losses.loss_sums(E0, b, per_atom=per_atom, F=F0, mask=mask)
    own = losses.local_counts(b, sel, True)
    torch.testing.assert_close(sums[[1, 3, 5]], own, rtol=1e-15, atol=0)
    whole = losses.energy_force_loss(E0, b, own, per_atom=per_atom, alpha=alpha, F=F0, mask=mask)
    assert abs(losses.loss_from_sums(sums, alpha=alpha, force_mode=True) - float(whole)) < 1e-13 * float(whole)
    # energy mode
    E = E0.clone().requires_grad_()
    loss = losses.energy_force_loss(E, b, counts, per_atom=per_atom)
    loss.backward()
    E2 = E0.clone().requires_grad_()
    err = (E2 - b.energy) / (b.natoms.double() if per_atom else 1.0)
    ref = (b.weight * err * err).sum() / counts[0]
    ref.backward()
    assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-13, atol=0)
    assert torch.allclose(E.grad, E2.grad, rtol=1e-12, atol=1e-16)


def test_plateau_patience_covers_min_steps(tmp_path, emt_h5):
    """The plateau scheduler waits plateau_patience epochs, but at least plateau_min_steps
    optimizer steps; the learning rate then halves after that many epochs without improvement
    (a constant validation loss here) and not before."""
    cfg = make_cfg(tmp_path, emt_h5, **{"training.plateau_min_steps": 40, "training.plateau_patience": 2})
    tr = Trainer(cfg, quiet=True)
    per = tr.stream.steps(0)
    want = max(2, -(-40 // per))
    assert want > 2 and tr.sched.patience == want
    lr0 = tr.opt.param_groups[0]["lr"]
    for _ in range(want + 1):          # the first call sets the best, then `want` bad epochs
        tr.sched.step(1.0)
        assert tr.opt.param_groups[0]["lr"] == lr0
    tr.sched.step(1.0)                 # one more bad epoch than the patience: halved
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr0)
    cfg = make_cfg(tmp_path / "b", emt_h5, **{"training.plateau_min_steps": 0, "training.plateau_patience": 2})
    assert Trainer(cfg, quiet=True).sched.patience == 2


def test_a_new_run_in_a_used_folder_keeps_the_earlier_run(tmp_path, emt_h5):
    """Training again into a folder that holds a finished run (a config reused without --resume)
    replaced its model, checkpoint and log without a word (sweep 7); they now move aside."""
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{emt_h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{epochs: 2, batch_atoms: 40, output: {tmp_path / 'r'}, progress_bar: 'off'}}
""")
    distmlip_cli(["train", str(tmp_path / "c.yaml")])
    first = (tmp_path / "r" / "model.pt").read_bytes()
    res = distmlip_cli(["train", str(tmp_path / "c.yaml"), "--set", "training.epochs=1", "--set", "training.seed=4"])
    prev = sorted((tmp_path / "r").glob("previous-*"))
    assert len(prev) == 1 and "held an earlier run" in res.stderr and "--resume auto" in res.stderr
    assert (prev[0] / "model.pt").read_bytes() == first and (prev[0] / "checkpoint.pt").is_file()
    assert (tmp_path / "r" / "model.pt").read_bytes() != first


def test_batch_atoms_below_the_largest_structure_is_said(tmp_path, emt_h5, capsys):
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{emt_h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{epochs: 1, batch_atoms: 3, output: {tmp_path / 'r'}, progress_bar: 'off'}}
""")
    Trainer(load_train_config(tmp_path / "c.yaml"))
    assert "training.batch_atoms 3 is below the largest training structure" in capsys.readouterr().err


@pytest.mark.parametrize("zbl", [True, False])
def test_atoms_on_top_of_each_other_are_named(tmp_path, zbl):
    """Coincident atoms (convert --min-distance 0) gave 'ZBL radii ... must satisfy 0 < inner <
    outer' without a structure, or a 'non-finite loss' naming every structure of the batch."""
    from distmlip.data.h5store import write_dataset

    structs = rattled_cu_au(6, seed=2)
    structs[4].positions[1] = structs[4].positions[0] + 1e-9
    write_dataset(tmp_path / "d.h5", structs)
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{tmp_path / 'd.h5'}], fractions: [1.0, 0.0, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
zbl: {{enabled: {str(zbl).lower()}}}
training: {{epochs: 1, output: {tmp_path / 'r'}, progress_bar: 'off'}}
""")
    from distmlip.errors import DataFormatError
    with pytest.raises(DataFormatError, match=r"structure 4 .*a Cu-Cu pair at .* A \(atoms on top of each other"):
        Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True)


def test_a_stored_split_without_validation_gives_one_from_its_training_part(tmp_path):
    """README's pipeline (convert --split-by-pattern train=...,test=...) stores training and test
    structures only: training ran with 0 validation structures whatever data.fractions said
    (sweep 9).  The validation share is drawn from the stored training part; test stays test, and
    evaluate's split is the same."""
    from distmlip.data.h5store import H5Dataset, write_dataset
    from distmlip.data.split import split_of

    structs = rattled_cu_au(30, seed=3)
    stored = np.array([2 if k % 5 == 0 else 0 for k in range(30)], dtype=np.int8)
    write_dataset(tmp_path / "d.h5", structs, split=stored)
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{tmp_path / 'd.h5'}], fractions: [0.8, 0.2, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{epochs: 1, output: {tmp_path / 'r'}, progress_bar: 'off'}}
""")
    tr = Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True)
    val, train = set(int(i) for i in tr.val_idx), set(int(i) for i in tr.train_idx)
    test = set(np.flatnonzero(stored == 2).tolist())
    assert len(val) >= 3 and not val & test and not train & test and len(val | train) == 24
    again = split_of(H5Dataset(tmp_path / "d.h5"), 0, (0.8, 0.2, 0.0))
    assert set(np.flatnonzero(again == 1).tolist()) == val


def test_the_epochs_training_loss_is_the_loss_of_the_whole_epoch(tmp_path):
    """log.csv's train_loss was the unweighted mean of the step losses: a batch of one large
    structure counted as much as a full batch, and the figure changed with the rank count at a
    frozen model (sweep 10).  It is now the energy loss of the whole epoch."""
    import csv

    from ase.build import bulk

    from distmlip.data.h5store import write_dataset
    from helpers import emt_structure

    structs = []
    for k in range(14):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + 2 * (k % 3 == 0), 1, 1))    # 4 and 12 atoms
        a.rattle(0.08, seed=k)
        structs.append(emt_structure(a, "cu", k))
    write_dataset(tmp_path / "d.h5", structs)
    (tmp_path / "c.yaml").write_text(f"""
data: {{train: [{tmp_path / 'd.h5'}], fractions: [1.0, 0.0, 0.0], batches: reshuffled}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [4]}}
training: {{mode: energy, epochs: 1, batch_atoms: 13, lr: 1.0e-14, min_lr: 0.0, scheduler: none,
           output: {tmp_path / 'r'}, progress_bar: 'off'}}
""")
    tr = Trainer(load_train_config(tmp_path / "c.yaml"), quiet=True)
    tr.fit()
    logged = float(list(csv.DictReader(open(tmp_path / "r" / "log.csv")))[-1]["train_loss"])
    whole = tr.evaluate_stream(tr.stream)["loss"]
    assert logged == pytest.approx(whole, rel=1e-6), (logged, whole)


def test_warm_start_cannot_add_an_element_but_a_declared_one_can_get_its_data(tmp_path):
    """An element new to the warm-started model is refused with the reason (the descriptor's type
    weights of every element depend on the species list); a first model that declared the element
    in model.species, without data for it, takes its data in the warm start."""
    from distmlip.data.h5store import write_dataset

    both = rattled_cu_au(24)
    cu = [s for s in both if set(s.numbers.tolist()) == {29}]
    assert len(cu) >= 4 and len(cu) < len(both)
    write_dataset(tmp_path / "cu.h5", cu)
    write_dataset(tmp_path / "both.h5", both)
    first = make_cfg(tmp_path / "a", tmp_path / "cu.h5", **{"model.species": ["Cu"]})
    Trainer(first, quiet=True).fit()
    warm = make_cfg(tmp_path / "b", tmp_path / "both.h5",
                    **{"training.warm_start": str(tmp_path / "a" / "run" / "model.pt")})
    with pytest.raises(ConfigError, match=r"has no network for \['Au'\].*an element cannot be added"):
        Trainer(warm, quiet=True)
    declared = make_cfg(tmp_path / "c", tmp_path / "cu.h5", **{"model.species": ["Cu", "Au"]})
    Trainer(declared, quiet=True).fit()
    warm = make_cfg(tmp_path / "d", tmp_path / "both.h5",
                    **{"training.warm_start": str(tmp_path / "c" / "run" / "model.pt")})
    tr = Trainer(warm, quiet=True)
    assert tr.model.species == ["Cu", "Au"]
    tr.fit()


def test_a_training_file_without_the_references_another_declares_is_named(tmp_path, capsys):
    """Two training files, one declaring reference energies and one not: the model took the first
    file's references for both without a word (sweep 17); the file is now named."""
    from distmlip.data.h5store import write_dataset

    S = rattled_cu_au(24)
    write_dataset(tmp_path / "a.h5", S[:12], reference_energies={"Cu": -0.5, "Au": -0.3})
    write_dataset(tmp_path / "b.h5", S[12:])
    cfg = make_cfg(tmp_path / "r", tmp_path / "a.h5", **{"data.train": [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]})
    capsys.readouterr()
    Trainer(cfg)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b.h5'} declares no reference energy for ['Au', 'Cu']" in err, err
    cfg = make_cfg(tmp_path / "s", tmp_path / "a.h5")
    Trainer(cfg)
    assert "declares no reference energy" not in capsys.readouterr().err


def test_a_runs_config_yaml_names_its_files_from_anywhere(tmp_path, emt_h5):
    """config.yaml records the data and output as absolute paths: with the relative paths as given,
    resuming the run from its own config.yaml in another directory looked for the data there
    (left by sweep 20).  The run also resumes from the configuration as first given (relative)."""
    import shutil

    import yaml

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(emt_h5, work / "data" / "set.h5")
    (work / "c.yaml").write_text("""
data: {train: [data/set.h5], fractions: [0.75, 0.25, 0.0]}
descriptor: {rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}
model: {hidden: [4]}
training: {epochs: 1, batch_atoms: 40, output: run, progress_bar: 'off'}
""")
    distmlip_cli(["train", "c.yaml"], cwd=work)
    written = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert written["data"]["train"] == [str(work / "data" / "set.h5")]
    assert written["training"]["output"] == str(work / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = distmlip_cli(["train", str(work / "run" / "config.yaml"), "--resume", "auto", "--set", "training.epochs=2"],
                       cwd=elsewhere)
    assert "resumed from" in res.stdout + res.stderr
    assert not (elsewhere / "run").exists()
    res = distmlip_cli(["train", "c.yaml", "--resume", "auto", "--set", "training.epochs=3"], cwd=work)
    assert "resumed from" in res.stdout + res.stderr and "differs" not in res.stderr, res.stderr


@pytest.mark.parametrize("optimizer", ["adamw", "lbfgs"])
def test_max_minutes_ends_the_run_with_its_models_and_a_resumable_checkpoint(tmp_path, emt_h5, optimizer, capsys):
    """training.max_minutes: the run stops at the end of the epoch in which the time passed, writes
    model.pt as at a normal end (status time_limit), and its checkpoint continues to the epochs.
    The progress line's ETA is the time limit's, not the epochs' (it said 46 min of a 90 s run)."""
    over = {"training.mode": "force", "training.epochs": 40, "training.optimizer": optimizer}
    tr = Trainer(make_cfg(tmp_path, emt_h5, **over, **{"training.max_minutes": 1e-6}))
    assert tr.fit() == "time_limit"
    assert tr.epoch == 1
    assert "ETA 0 s (max_minutes; about epoch 1)" in capsys.readouterr().out
    assert (tmp_path / "run" / "model.pt").is_file()
    tr = Trainer(make_cfg(tmp_path, emt_h5, **over), resume=str(tmp_path / "run" / "checkpoint.pt"), quiet=True)
    assert tr.fit() in ("done", "converged") and tr.epoch > 1
    with pytest.raises(ConfigError, match="max_minutes"):
        make_cfg(tmp_path, emt_h5, **{"training.max_minutes": -1})


def test_a_kept_model_that_traded_forces_for_energies_is_named(tmp_path, emt_h5, capsys):
    """The kept model has the lowest validation loss; when the last validated epoch has a quarter
    less force (or energy) error, the log says so and names last_model.pt (a heterogeneous set kept
    epoch 599 of 2,000 with 2.2x the last epoch's force error, said nowhere).  Both directions,
    the same epoch, unknown values and small differences say nothing."""
    from distmlip.training.trainer import selection_note

    kept = {"epoch": 599, "E_rmse_meV_atom": 18.4, "F_mae": 0.0302}
    note = selection_note(kept, {"epoch": 2000, "E_rmse_meV_atom": 37.3, "F_mae": 0.0137})
    assert note and "0.45x its force error" in note and "last_model.pt" in note and "epoch 599" in note
    assert "energy error" in selection_note(kept, {"epoch": 9, "E_rmse_meV_atom": 9.0, "F_mae": 0.031})
    for last in ({"epoch": 599, "E_rmse_meV_atom": 1.0, "F_mae": 0.001},            # the same epoch
                 {"epoch": 700, "E_rmse_meV_atom": 17.0, "F_mae": 0.025},          # within a quarter
                 {"epoch": 700, "E_rmse_meV_atom": float("nan"), "F_mae": 0.001}, None):
        assert selection_note(kept, last) is None
    assert selection_note(None, kept) is None
    # wired: a force run whose last epoch is made to look better says it after "model written"
    tr = Trainer(make_cfg(tmp_path, emt_h5, **{"training.mode": "force", "training.epochs": 3}))
    tr.fit()
    capsys.readouterr()
    tr._kept_val = dict(tr._last_val, epoch=1, F_mae=tr._last_val["F_mae"] * 2)
    tr._write_models()
    out = capsys.readouterr().out
    assert "model written" in out and "note: the kept model (epoch 1:" in out and "0.50x its force error" in out, out
