"""A model's trainable parameters as views of one contiguous tensor, for the optimiser.

A Behler-Parrinello model is a few dozen small tensors (weights and biases of one network per
element).  Per training step, the optimiser loops over them in Python, and the autograd engine
runs one gradient-accumulation node per tensor: a noticeable share of a force-training step on a
small molecule (docs/results.md).  :class:`FlatParameters` stores every
parameter as a view of ONE leaf tensor ``flat`` (per dtype and device; a model has one), and
every ``.grad`` as a view of ``flat.grad``:

* the optimiser updates ``flat`` (one fused Adam call); the modules see the new values;
* gradients computed per parameter (autograd through the modules) land in ``flat.grad`` through
  the views; inside :meth:`routing` (the trainer's step), the CPU force-training operator
  (:mod:`distmlip.models.forces_op`) takes ``flat`` itself as its input and returns one flat
  gradient (one accumulation); outside it, gradients reach the parameters as usual, so code
  that reads ``p.grad`` after ``model.zero_grad(); loss.backward()`` keeps working;
* state dicts of the model are unchanged (the parameters keep their names and shapes).

Contract: zero the gradients with :meth:`zero_grad` (not ``optimizer.zero_grad(set_to_none=True)``
or ``model.zero_grad()``, which would detach the views), and call :meth:`sync` before reading
``flat.grad`` (the trainer does both).  :meth:`sync` repairs a parameter whose ``.grad`` was
replaced (adding it into the flat gradient), and raises if a parameter's storage was replaced
(``model.to(...)``, ``load_state_dict(assign=True)``): flatten after moving the model.
"""
from __future__ import annotations

import contextlib

import torch

from ..models.forces_op import FLAT_PARAMETERS_ATTR


class FlatParameters:
    """Views of the trainable parameters of ``model`` into one flat leaf tensor per (dtype,
    device) group.  ``tensors``: the flat leaves (give them to the optimiser);
    ``grad_inputs``: what ``loss.backward(inputs=...)`` should name (the leaves and the
    parameters)."""

    ATTR = FLAT_PARAMETERS_ATTR

    def __init__(self, model: torch.nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("FlatParameters: the model has no trainable parameters")
        groups: dict = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.params = params
        self.tensors: list[torch.Tensor] = []
        self._views = []            # (parameter, data view, grad view)
        for (dtype, device), ps in groups.items():
            n = sum(p.numel() for p in ps)
            flat = torch.empty(n, dtype=dtype, device=device)
            grad = torch.zeros(n, dtype=dtype, device=device)
            off = 0
            for p in ps:
                k = p.numel()
                flat[off:off + k].copy_(p.detach().reshape(-1))
                off += k
            flat.requires_grad_(True)
            flat.grad = grad
            off = 0
            for p in ps:
                k = p.numel()
                dv = flat.detach()[off:off + k].view(p.shape)
                gv = grad[off:off + k].view(p.shape)
                p.data = dv
                p.grad = gv
                self._views.append((p, dv, gv))
                off += k
            self.tensors.append(flat)
        self._grads = [t.grad for t in self.tensors]
        self.grad_inputs = self.tensors + params
        self._single = self.tensors[0] if len(self.tensors) == 1 else None
        self._matched = None
        self.route = False
        # on every module: the operator that can take the flat tensor finds it on its term
        for m in model.modules():
            m.__dict__[self.ATTR] = self

    @contextlib.contextmanager
    def routing(self):
        """Within this context, operators that can (models.forces_op) send their parameter gradient
        to the flat tensor in one piece: the caller then reads it after :meth:`sync` and names
        :attr:`grad_inputs` in ``backward(inputs=...)``."""
        old = self.route
        self.route = True
        try:
            yield self
        finally:
            self.route = old

    @classmethod
    def of(cls, model) -> "FlatParameters | None":
        return model.__dict__.get(cls.ATTR)

    def _covers(self, params) -> bool:
        """Whether ``params`` are exactly all of this model's parameters, in order, in one group."""
        if self._single is None:
            return False
        if params is self._matched:
            return True
        if len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params)):
            self._matched = params
            return True
        return False

    def flat_for(self, params) -> torch.Tensor | None:
        """The flat leaf when ``params`` are covered (:meth:`_covers`) and within :meth:`routing`,
        else None."""
        return self._single if self.route and self._covers(params) else None

    def flat_grad_for(self, params) -> torch.Tensor | None:
        """The flat gradient buffer when ``params`` are covered, else None (for code that adds a
        flat gradient itself)."""
        return self._grads[0] if self._covers(params) else None

    def zero_grad(self) -> None:
        for t, g in zip(self.tensors, self._grads):
            if t.grad is not g:
                t.grad = g
            g.zero_()
        for p, _, gv in self._views:
            if p.grad is not gv:
                p.grad = gv

    def sync(self) -> None:
        """Make ``flat.grad`` hold every parameter's gradient (see the module docstring).  The
        parameters' storage is checked on the first call and then every 32nd (a replaced storage
        is a programming error; the check costs about as much as the rest of the step's
        bookkeeping)."""
        for t, g in zip(self.tensors, self._grads):
            if t.grad is not g:
                if t.grad is not None:
                    g.add_(t.grad)
                t.grad = g
        self._n_sync = getattr(self, "_n_sync", -1) + 1
        if self._n_sync % 32 == 0:
            self.check_storage()
        for p, _, gv in self._views:
            if p.grad is not gv:
                if p.grad is not None:
                    gv.add_(p.grad)
                p.grad = gv

    def check_storage(self) -> None:
        for p, dv, _ in self._views:
            if p.data_ptr() != dv.data_ptr() or p.shape != dv.shape:
                raise RuntimeError("FlatParameters: a parameter's storage was replaced after flattening "
                                   "(model.to(), load_state_dict(assign=True), ...): flatten again")

    # ------------------------------------------------------------------ optimiser state
    def optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """``state`` (an optimiser state dict) for the flat leaves: returned unchanged when it
        already is; converted when it was saved for the individual parameters (checkpoints of
        distmlip before flattening): per-parameter tensors of the same shape are concatenated
        in order, scalars (``step``) taken from the first parameter."""
        groups = state.get("param_groups") or []
        n_saved = sum(len(g.get("params", [])) for g in groups)
        if n_saved == len(self.tensors) or n_saved != len(self.params) or len(groups) != 1:
            return state
        ids = groups[0]["params"]
        per = [state.get("state", {}).get(i, {}) for i in ids]
        new_state = {}
        if all(per):
            by_group: dict = {}
            for p, st in zip(self.params, per):
                by_group.setdefault((p.dtype, p.device), []).append((p, st))
            for k, items in enumerate(by_group.values()):
                st0 = items[0][1]
                merged = {}
                for name, v in st0.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        merged[name] = torch.cat([st[name].reshape(-1) for _, st in items])
                    else:
                        merged[name] = v.clone() if isinstance(v, torch.Tensor) else v
                new_state[k] = merged
        group = {k: v for k, v in groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.tensors)))
        return {"state": new_state, "param_groups": [group]}


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``; for the trainer's fused Adam/AdamW on flat tensors, the same update through
    one direct call of torch's fused kernel (``torch._fused_adam(w)_``, exactly what the fused
    Adam runs), skipping about 25 microseconds of per-step Python bookkeeping (profiling
    wrapper, state grouping).  Falls back to ``opt.step()`` whenever the configuration is anything
    else (first step, hooks, amsgrad, maximize, tensor learning rate, several groups, ...)."""
    from torch.optim import Adam, AdamW
    from torch.optim import optimizer as _opt_mod

    groups = opt.param_groups
    if type(opt) not in (Adam, AdamW) or len(groups) != 1 or opt._optimizer_step_pre_hooks \
            or opt._optimizer_step_post_hooks or getattr(_opt_mod, "_global_optimizer_pre_hooks", None) \
            or getattr(_opt_mod, "_global_optimizer_post_hooks", None):
        opt.step()
        return
    g = groups[0]
    lr = g["lr"]
    if (not g.get("fused") or g.get("amsgrad") or g.get("maximize") or g.get("capturable")
            or g.get("differentiable") or isinstance(lr, torch.Tensor)):
        opt.step()
        return
    params, grads, m, v, steps = [], [], [], [], []
    for p in g["params"]:
        st = opt.state.get(p)
        if not st and p.grad is not None and p.device.type == "cpu" and not p.grad.is_sparse:
            # torch's lazy state initialisation of a fused Adam (adam.py _init_group), done here
            # so that the first step takes this path too (opt.step() imports TorchDynamo)
            from torch.optim.optimizer import _get_scalar_dtype

            st = opt.state[p]
            st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.grad is None or not st or "step" not in st or p.grad.is_sparse or p.device.type != "cpu":
            opt.step()
            return
        params.append(p.detach())
        grads.append(p.grad)
        m.append(st["exp_avg"])
        v.append(st["exp_avg_sq"])
        steps.append(st["step"])
    # what torch's step wrapper records (lr schedulers check it to warn about a wrong call order)
    opt._opt_called = True
    decoupled = g.get("decoupled_weight_decay", type(opt) is AdamW)
    beta1, beta2 = g["betas"]
    torch._foreach_add_(steps, 1)
    fn = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fn(params, grads, m, v, [], steps, amsgrad=False, lr=lr, beta1=float(beta1), beta2=float(beta2),
       weight_decay=g["weight_decay"], eps=g["eps"], maximize=False, grad_scale=None, found_inf=None)


def avoid_dynamo_import() -> None:
    """torch's optimizers wrap add_param_group, state_dict, load_state_dict and zero_grad so that
    TorchDynamo does not trace them; the wrapper imports torch._dynamo on its first call, which
    takes seconds of start-up per process (a third of a short training run's wall time on two
    cores).  distmlip never compiles the optimizer, so the plain functions are registered as
    their own "disabled" versions, which the wrapper then calls directly.  Nothing changes where
    torch._dynamo is already imported or where torch's wrapper differs from the one expected."""
    import sys

    if "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "state_dict", "load_state_dict", "zero_grad"):
        fn = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            try:
                fn.__dynamo_disable = fn
            except (AttributeError, TypeError):
                pass
