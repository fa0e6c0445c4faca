"""training.optimizer: lbfgs (distmlip/training/lbfgs.py): the iteration reaches the minimum of
functions with known minima, the trainer's full-batch loss never rises from one epoch to the next,
a run stopped and resumed equals the uninterrupted one bit for bit, 1 rank equals 2 ranks (real
mpirun) to rounding, and the settings that would change the loss between evaluations are refused."""
import csv
import re

import pytest
import torch

from distmlip.errors import ConfigError
from distmlip.training.lbfgs import LBFGS
from distmlip.training.trainer import Trainer
from helpers import REPO, mpirun
from test_train import make_cfg, weights


def _evaluator(f, x):
    """f's value at x, its gradient written into x.grad (what the trainer's evaluation does)."""
    def evaluate():
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            v = f(y)
            (g,) = torch.autograd.grad(v, y)
        x.grad.copy_(g)
        return float(v.detach())
    return evaluate


def _minimise(f, x0, iters=200, history=10):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    x.grad = torch.zeros_like(x)
    evaluate = _evaluator(f, x)
    opt = LBFGS(x, history=history)
    losses = []
    for _ in range(iters):
        if not opt.iteration(evaluate):
            break
        losses.append(opt.loss)
    return x.detach(), losses, opt


def test_lbfgs_finds_the_minimum_of_a_quadratic_and_of_rosenbrocks_valley():
    A = torch.tensor([[10.0, 2.0, 0.0], [2.0, 3.0, 0.5], [0.0, 0.5, 0.2]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x, losses, _ = _minimise(lambda v: 0.5 * v @ A @ v - b @ v, [3.0, -1.0, 4.0])
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-7), x
    assert all(b_ <= a + 1e-15 for a, b_ in zip(losses, losses[1:]))      # Armijo: never up

    def rosen(v):
        return ((1 - v[:-1]) ** 2).sum() + 100.0 * ((v[1:] - v[:-1] ** 2) ** 2).sum()
    x, losses, opt = _minimise(rosen, [-1.2, 1.0, -0.5, 0.8], iters=2000)
    assert torch.allclose(x, torch.ones(4, dtype=torch.float64), atol=1e-6), (x, opt.n_iter)
    assert all(b_ <= a + 1e-15 for a, b_ in zip(losses, losses[1:]))


def test_lbfgs_state_round_trip_continues_identically():
    def f(v):
        return ((v - torch.arange(5, dtype=torch.float64)) ** 4).sum() + (v ** 2).sum()
    xa, _, oa = _minimise(f, [1.0, -1.0, 2.0, 0.0, 3.0], iters=6)
    xb = xa.clone().requires_grad_(True)
    xb.grad = torch.zeros_like(xb)
    ob = LBFGS(xb, history=10)
    ob.load_state_dict(oa.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        ob.load_state_dict({"state": {}, "param_groups": []})

    def step(x, opt):
        opt.iteration(_evaluator(f, x))
    xa = xa.clone().requires_grad_(True)
    xa.grad = torch.zeros_like(xa)
    oa.x = xa
    for _ in range(3):
        step(xa, oa)
        step(xb, ob)
    assert torch.equal(xa.detach(), xb.detach())


def _rows(run):
    return list(csv.DictReader(open(run / "log.csv")))


@pytest.mark.parametrize("mode", ["energy", "force"])
def test_lbfgs_training_loss_never_rises_and_resume_is_bit_for_bit(tmp_path, emt_h5, mode):
    over = {"training.mode": mode, "training.alpha": 0.3, "training.optimizer": "lbfgs", "training.epochs": 12}
    full = make_cfg(tmp_path / "a", emt_h5, **over)
    tr = Trainer(full, quiet=True)
    before = tr.evaluate_stream(tr.stream)["loss"]
    assert tr.fit() == "done"
    loss = [float(r["train_loss"]) for r in _rows(tmp_path / "a" / "run")]
    assert len(loss) == 12
    assert all(b <= a * (1 + 1e-12) for a, b in zip(loss, loss[1:])), loss
    assert loss[-1] < 0.2 * before, (before, loss)
    # stopped after 5 epochs, resumed to 12: the same parameters and log, bit for bit
    Trainer(make_cfg(tmp_path / "b", emt_h5, **{**over, "training.epochs": 5}), quiet=True).fit()
    Trainer(make_cfg(tmp_path / "b", emt_h5, **over), resume=str(tmp_path / "b" / "run" / "checkpoint.pt"),
            quiet=True).fit()
    wa = weights(tmp_path / "a" / "run" / "last_model.pt")["state_dict"]
    wb = weights(tmp_path / "b" / "run" / "last_model.pt")["state_dict"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "a" / "run")) == strip(_rows(tmp_path / "b" / "run"))


@pytest.mark.parametrize("key,value", [("training.loss", "rmse"), ("training.grad_clip", 1.0),
                                       ("training.weight_decay", 0.01)])
def test_lbfgs_refuses_settings_that_change_the_loss_between_evaluations(tmp_path, emt_h5, key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1] + ".*lbfgs"):
        make_cfg(tmp_path, emt_h5, **{"training.optimizer": "lbfgs", key: value})


# auto: the plateau scheduler's first cut comes within the first 16 epochs on the emt set
_SWITCHING = {"training.mode": "force", "training.alpha": 0.3, "training.lr": 0.05, "training.plateau_patience": 2,
              "training.plateau_min_steps": 0}


def _mpi_train(tmp_path, emt_h5, n, extra="", mode="force"):
    cfg = tmp_path / f"c{n}.yaml"
    cfg.write_text(f"""
data: {{train: [{emt_h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [6, 6]}}
training: {{mode: {mode}, alpha: 0.3, batch_atoms: 16, output: {tmp_path / f'run{n}'}, progress_bar: 'off'{extra}}}
""")
    return mpirun(n, [str(REPO / "tests" / "mpi_scripts" / "train_cli.py"), "train", str(cfg)], timeout=300)


@pytest.mark.parametrize("mode", ["force", "energy"])
def test_lbfgs_one_rank_equals_two_ranks(tmp_path, emt_h5, mode):
    """Energy mode too: its loss comes from each rank's share of the descriptor cache, and auto
    now switches energy training to L-BFGS."""
    out = {}
    for n in (1, 2):
        _mpi_train(tmp_path, emt_h5, n, ", epochs: 10, optimizer: lbfgs", mode=mode)
        out[n] = weights(tmp_path / f"run{n}" / "last_model.pt")["state_dict"]
    init_moved = max(float((out[1][k].double() - out[2][k].double()).abs().max()) for k in out[1])
    assert init_moved < 1e-8, init_moved
    l1 = [float(r["train_loss"]) for r in _rows(tmp_path / "run1")]
    l2 = [float(r["train_loss"]) for r in _rows(tmp_path / "run2")]
    assert l1[-1] < 0.5 * l1[0]
    assert max(abs(a - b) / a for a, b in zip(l1, l2)) < 1e-8, (l1, l2)


def test_optimizer_auto_switches_on_every_rank_at_once(tmp_path, emt_h5):
    """The cut follows the reduced validation loss, so every rank switches at the same epoch (a
    rank left in Adam's all-reduce beside one in L-BFGS's would hang the job); the 2-rank run ends
    in the L-BFGS phase with a falling loss."""
    res = _mpi_train(tmp_path, emt_h5, 2, ", epochs: 20, lr: 0.05, plateau_patience: 2, plateau_min_steps: 0")
    assert "adamw stalled at epoch" in res.stdout + res.stderr
    st = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)
    assert st["optimizer_phase"] == "lbfgs" and st["optimizer"]["kind"] == "lbfgs"
    loss = [float(r["train_loss"]) for r in _rows(tmp_path / "run2")]
    assert loss[-1] < 0.5 * loss[0]


def test_lbfgs_ends_a_fit_that_no_longer_falls_and_names_over_fitting(tmp_path, emt_h5, capsys):
    """Energy-only training of a network with more parameters than the training energies: the loss
    goes to zero and the steps to nothing; the run must end as converged, not spend its epochs on
    line searches of 30 evaluations each."""
    cfg = make_cfg(tmp_path, emt_h5, **{"training.optimizer": "lbfgs", "training.epochs": 20000,
                                        "model.hidden": [24, 24]})
    tr = Trainer(cfg)
    assert tr.fit() == "converged"
    rows = _rows(tmp_path / "run")
    assert len(rows) < 20000
    assert "lbfgs: converged at epoch" in capsys.readouterr().out
    assert (tmp_path / "run" / "model.pt").is_file()


def test_optimizer_auto_starts_with_adamw_and_says_what_follows(tmp_path, emt_h5, capsys, monkeypatch):
    force = {"training.mode": "force", "training.epochs": 1}
    tr = Trainer(make_cfg(tmp_path / "a", emt_h5, **force))
    out = capsys.readouterr().out
    assert type(tr.opt) is torch.optim.AdamW and tr._auto_switch
    assert "optimizer: auto: adamw, then lbfgs once adamw stalls" in out and "hint" not in out
    # an explicit adamw force run on a small set is pointed to auto; lbfgs is lbfgs
    Trainer(make_cfg(tmp_path / "b", emt_h5, **force, **{"training.optimizer": "adamw"}))
    assert "training.optimizer: auto (adamw, then lbfgs" in capsys.readouterr().out
    tr = Trainer(make_cfg(tmp_path / "c", emt_h5, **force, **{"training.optimizer": "lbfgs"}))
    assert "reached" not in capsys.readouterr().out
    assert type(tr.opt) is LBFGS
    # energy training switches too (it beat AdamW alone there: docs/results.md, twenty-third session)
    tr = Trainer(make_cfg(tmp_path / "f", emt_h5, **{"training.epochs": 1}))
    assert type(tr.opt) is torch.optim.AdamW and tr._auto_switch
    assert "optimizer: auto: adamw, then lbfgs once adamw stalls" in capsys.readouterr().out
    # where auto stays with AdamW, the log names why
    for over, why in (({**force, "training.grad_clip": 1.0}, "training.grad_clip"),
                      ({**force, "training.scheduler": "cosine"}, "training.scheduler: cosine")):
        tr = Trainer(make_cfg(tmp_path / f"d{len(why)}", emt_h5, **over))
        assert type(tr.opt) is torch.optim.AdamW and not tr._auto_switch
        assert f"optimizer: auto: adamw to the end: {why}" in capsys.readouterr().out
    monkeypatch.setattr("distmlip.training.trainer.AUTO_LBFGS_ATOMS", 10)
    tr = Trainer(make_cfg(tmp_path / "e", emt_h5, **force))
    assert not tr._auto_switch and "training atoms, above 10 " in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["force", "energy"])
def test_optimizer_auto_switches_to_lbfgs_when_adamw_stalls_and_resumes_bit_for_bit(tmp_path, emt_h5, capsys, mode):
    """The switch comes at the end of the epoch of the plateau scheduler's first cut; from there
    the training loss never rises.  Runs stopped before and after the switch and resumed equal the
    uninterrupted run bit for bit (the checkpoint records the phase; the one written at the switch
    epoch already holds L-BFGS).  Energy training (the descriptor cache's path) the same."""
    over = {**_SWITCHING, "training.epochs": 24, "training.mode": mode}
    tr = Trainer(make_cfg(tmp_path / "a", emt_h5, **over))
    assert tr.fit() == "done"
    assert type(tr.opt) is LBFGS
    out = capsys.readouterr().out
    k = int(re.search(r"optimizer: auto: adamw stalled at epoch (\d+)", out).group(1))
    assert 4 <= k <= 16, k
    rows = _rows(tmp_path / "a" / "run")
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:k] == [0.05] * k and lrs[k] != 0.025       # Adam to the cut, then step lengths
    loss = [float(r["train_loss"]) for r in rows[k:]]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(loss, loss[1:])), loss
    assert loss[-1] < 0.5 * float(rows[k - 1]["train_loss"])
    for stop in (k - 3, k, k + 4):
        d = tmp_path / f"s{stop}"
        Trainer(make_cfg(d, emt_h5, **{**over, "training.epochs": stop}), quiet=True).fit()
        Trainer(make_cfg(d, emt_h5, **over), resume=str(d / "run" / "checkpoint.pt"), quiet=True).fit()
        wa = weights(tmp_path / "a" / "run" / "last_model.pt")["state_dict"]
        wb = weights(d / "run" / "last_model.pt")["state_dict"]
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (stop, k)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
        assert strip(rows) == strip(_rows(d / "run")), stop


def test_lbfgs_a_non_finite_loss_stops_the_run_without_a_model(tmp_path, emt_h5):
    """The loss goes non-finite where L-BFGS stands (an overflow in the data's energies, say):
    the run raises, names it, and writes no model file for that state."""
    from distmlip.errors import NonFiniteError

    tr = Trainer(make_cfg(tmp_path, emt_h5, **{"training.mode": "force", "training.optimizer": "lbfgs",
                                               "training.epochs": 5}), quiet=True)
    real = tr._lbfgs_evaluate
    calls = {"n": 0}

    def evaluate(acc):
        calls["n"] += 1
        real(acc)
        return float("nan") if calls["n"] > 3 else real(acc)
    tr._lbfgs_evaluate = evaluate
    with pytest.raises(NonFiniteError, match="not finite where L-BFGS stands|non-finite"):
        tr.fit()
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_checkpoint_from_before_auto_resumes_with_adamw(tmp_path, emt_h5, capsys):
    """Checkpoints written while adamw was the default record optimizer adamw and no phase: a config
    that takes the new default (auto) resumes them as the AdamW runs they were; a checkpoint of this
    version keeps refusing an optimizer change."""
    force = {"training.mode": "force", "training.epochs": 2}
    Trainer(make_cfg(tmp_path, emt_h5, **force, **{"training.optimizer": "adamw"}), quiet=True).fit()
    ck = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(ConfigError, match="training.optimizer: 'adamw' -> 'auto'"):
        Trainer(make_cfg(tmp_path, emt_h5, **{**force, "training.epochs": 3}), resume=str(ck))
    st = torch.load(ck, weights_only=False)
    del st["optimizer_phase"]
    torch.save(st, ck)
    tr = Trainer(make_cfg(tmp_path, emt_h5, **{**force, "training.epochs": 3}), resume=str(ck))
    assert "continues with it" in capsys.readouterr().out
    assert type(tr.opt) is torch.optim.AdamW and not tr._auto_switch
    assert tr.fit() == "done"


def test_optimizer_auto_switches_after_epoch_300_when_as_many_remain(tmp_path, emt_h5, capsys, monkeypatch):
    """Without a plateau cut, auto switches at the end of AUTO_SWITCH_EPOCH (here 5) when at least as
    many epochs remain, and not in a shorter run."""
    monkeypatch.setattr("distmlip.training.trainer.AUTO_SWITCH_EPOCH", 5)
    over = {"training.mode": "force", "training.plateau_patience": 1000, "training.plateau_min_steps": 0}
    tr = Trainer(make_cfg(tmp_path / "a", emt_h5, **over, **{"training.epochs": 10}))
    tr.fit()
    assert "optimizer: auto: epoch 5 of adamw done: lbfgs from the next epoch on" in capsys.readouterr().out
    assert type(tr.opt) is LBFGS
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "a" / "run")]
    assert lrs[:5] == [0.01] * 5 and lrs[5] != 0.01
    tr = Trainer(make_cfg(tmp_path / "b", emt_h5, **over, **{"training.epochs": 9}))
    tr.fit()
    assert type(tr.opt) is torch.optim.AdamW and "lbfgs from the next epoch" not in capsys.readouterr().out
