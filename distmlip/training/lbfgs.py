"""Full-batch L-BFGS on the flat parameter vector (``training.optimizer: lbfgs``).

Why full batch: a Behler-Parrinello model has thousands to a few tens of thousands of
parameters, and on data sets of up to some tens of thousands of structures one evaluation of the
whole loss and its gradient costs about what one epoch of mini-batch steps does.  Adam's steps
then stall at the level of their own gradient noise unless the learning rate is annealed for a
long time; quasi-Newton steps on the exact loss keep lowering it (aenet's own trainers use BFGS
for the same reason).  Measured against Adam on the same model and data in docs/results.md.

One :meth:`LBFGS.iteration` is: the direction from the two-loop recursion over the last
``history`` pairs (s, y), then a backtracking line search on the Armijo condition that starts at
the unit step (quadratic interpolation of the step, kept within [0.1, 0.5] of the last).  A pair
enters the history only when s.y > 0, so the implied inverse Hessian stays positive definite
without a curvature condition in the line search.  Every rank runs the same iteration on the same
reduced loss and gradient, so the parameters stay identical on all ranks without a broadcast.

``evaluate()`` (the caller's) computes the global loss and writes the global gradient into the
flat gradient buffer at the current parameters; it returns the loss as a float.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["LBFGS"]

ARMIJO_C1 = 1.0e-4
MAX_TRIES = 30
# converged: this many iterations in a row each lowered the loss by less than STALL_REL of it (a
# fit at its rounding level, or a training loss driven to zero: energy-only training of few
# structures took tiny steps of 30 line-search evaluations each, 100x an epoch's planned cost)
STALL_REL = 1.0e-10
STALL_ITERATIONS = 5


class LBFGS:
    """L-BFGS over one flat parameter tensor ``x`` whose ``.grad`` is the flat gradient."""

    def __init__(self, x: torch.Tensor, history: int = 20):
        self.x = x
        self.history = int(history)
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.loss: float | None = None      # at the current x (None: not evaluated yet)
        self.g: torch.Tensor | None = None
        self.t = 0.0                        # the last accepted step length
        self.n_iter = 0
        self.n_evals = 0
        self.stalled = 0
        # what the trainer's logs and error messages read as the learning rate
        self.param_groups = [{"lr": 0.0, "params": [x]}]

    # ---------------------------------------------------------------------------------- step
    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion (H0 = s.y / y.y of the newest pair)."""
        q = g.neg()
        if not self.s:
            return q
        alphas = []
        for s, y in zip(reversed(self.s), reversed(self.y)):
            rho = 1.0 / float(torch.dot(y, s))
            a = rho * float(torch.dot(s, q))
            q.add_(y, alpha=-a)
            alphas.append((a, rho))
        s, y = self.s[-1], self.y[-1]
        q.mul_(float(torch.dot(s, y)) / float(torch.dot(y, y)))
        for (s, y), (a, rho) in zip(zip(self.s, self.y), reversed(alphas)):
            b = rho * float(torch.dot(y, q))
            q.add_(s, alpha=a - b)
        return q

    def iteration(self, evaluate: Callable[[], float]) -> bool:
        """One iteration; False when converged: no step along the direction (nor along the
        steepest descent, after dropping the history) lowers the loss, or STALL_ITERATIONS
        iterations in a row lowered it by less than STALL_REL of it.  On return the flat gradient
        buffer holds the gradient at ``x`` (the last evaluation is always at the accepted point)."""
        with torch.enable_grad():     # (evaluate may differentiate through autograd)
            return self._iteration(self.x, evaluate)

    def _set(self, x: torch.Tensor, value: torch.Tensor) -> None:
        with torch.no_grad():
            x.copy_(value)

    def _iteration(self, x, evaluate) -> bool:
        if self.g is None:
            self.loss = float(evaluate())
            self.n_evals += 1
            self.g = x.grad.detach().clone()
        if not math.isfinite(self.loss):
            return False                     # (the caller names the non-finite state)
        while True:
            steepest = not self.s
            d = self._direction(self.g)
            gd = float(torch.dot(self.g, d))
            if not gd < 0.0:                 # not a descent direction: start the history anew
                self.s.clear()
                self.y.clear()
                steepest = True
                d = self.g.neg()
                gd = -float(torch.dot(self.g, self.g))
            if gd == 0.0:
                return False
            # the first step of a fresh history: at most a unit move in the 1-norm of the gradient
            t = 1.0 if self.s else min(1.0, 1.0 / max(float(self.g.abs().sum()), 1e-300))
            x0 = x.detach().clone()
            accepted = False
            for _ in range(MAX_TRIES):
                self._set(x, x0 + t * d)
                f = float(evaluate())
                self.n_evals += 1
                if math.isfinite(f) and f <= self.loss + ARMIJO_C1 * t * gd:
                    accepted = True
                    break
                # minimum of the quadratic through f(0), f'(0) and f(t), within [0.1 t, 0.5 t]
                if math.isfinite(f):
                    denom = 2.0 * (f - self.loss - gd * t)
                    tq = -gd * t * t / denom if denom > 0 else 0.5 * t
                    t = min(max(tq, 0.1 * t), 0.5 * t)
                else:
                    t *= 0.1
            if accepted:
                break
            self._set(x, x0)
            self.s.clear()
            self.y.clear()
            if not steepest:
                continue                     # try the steepest descent once
            # the buffers back at x0 for the caller; a loss no longer finite there (it was) is
            # kept, so that the caller names it instead of ending the run as converged
            self.loss = float(evaluate())
            self.n_evals += 1
            return False
        g_new = x.grad.detach().clone()
        s = (t * d)
        y = g_new - self.g
        sy = float(torch.dot(s, y))
        if sy > 1e-12 * float(torch.dot(y, y)):
            self.s.append(s)
            self.y.append(y)
            if len(self.s) > self.history:
                self.s.pop(0)
                self.y.pop(0)
        small = self.loss - f <= STALL_REL * abs(self.loss)
        self.stalled = self.stalled + 1 if small else 0
        self.loss, self.g, self.t = f, g_new, t
        self.n_iter += 1
        self.param_groups[0]["lr"] = t
        return self.stalled < STALL_ITERATIONS

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"kind": "lbfgs", "history": self.history, "s": [t.clone() for t in self.s],
                "y": [t.clone() for t in self.y], "loss": self.loss,
                "g": None if self.g is None else self.g.clone(), "t": self.t, "n_iter": self.n_iter,
                "n_evals": self.n_evals, "stalled": self.stalled, "param_groups": [{"lr": self.t, "params": [0]}]}

    def load_state_dict(self, st: dict) -> None:
        if st.get("kind") != "lbfgs":
            raise ValueError("not an L-BFGS state (the checkpoint was written by another optimizer)")
        dev, dt = self.x.device, self.x.dtype
        self.s = [t.to(dev, dt) for t in st["s"]]
        self.y = [t.to(dev, dt) for t in st["y"]]
        self.loss = st["loss"]
        self.g = None if st["g"] is None else st["g"].to(dev, dt)
        self.t, self.n_iter, self.n_evals = float(st["t"]), int(st["n_iter"]), int(st["n_evals"])
        self.stalled = int(st.get("stalled", 0))
        self.param_groups[0]["lr"] = self.t
