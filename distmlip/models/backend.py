"""Which code runs for a model on a device, decided in one place.

A step of a Behler-Parrinello model can run on several implementations of the same arithmetic,
all tested against each other:

``descriptor``  ``fused`` (compiled kernels, csrc/chebyshev*) or ``reference`` (pure PyTorch)
``networks``    ``compiled`` (csrc/nets_cpu.cpp: one operator for a block of atoms) or ``torch``
``forces``      ``one-node`` (descriptor, networks and descriptor VJP in one compiled operator
                and one backward, csrc/bpnn_forces_cpu.cpp), ``closed-form`` (the networks'
                input gradient in closed form, the descriptor's VJP through autograd) or
                ``autograd`` (autograd through everything, twice for force training)
``loss``        ``compiled`` (one operator for the loss and its gradients) or ``torch``

:func:`choose` picks, for a device, the fastest that the compiled extension provides there (it
asks the dispatcher whether each operator has a kernel for the device, so a CUDA torch with a
CPU-only build of the extension falls back instead of failing at dispatch) and that supports
the model (activations without a kernel run on torch operators).  Which operators have no CUDA
kernel (so that a GPU runs torch networks, closed-form forces and the torch loss) is declared in
one place, :data:`distmlip._ext.CPU_ONLY_OPS`, which ``make cuda-build-check`` holds a CUDA build
to; the plan itself only asks the dispatcher.  A model keeps one
:class:`Plan` per device type; :meth:`Plan.describe` is the line the stages log.  Tests pin
paths with ``model.set_plan(networks="torch", forces="autograd")``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._ext import has_kernel
from ..descriptors.spec import BACKENDS as DESCRIPTOR_CHOICES  # noqa: F401  (re-exported)
from ..descriptors.spec import choose_kernels
from ..errors import ConfigError
from . import activations as act_table
CHOICES = {
    "descriptor": ("fused", "reference"),
    "networks": ("compiled", "torch"),
    "forces": ("one-node", "closed-form", "autograd"),
    "loss": ("compiled", "torch"),
}


@dataclass(frozen=True)
class Plan:
    device: str          # device type: "cpu" or "cuda"
    descriptor: str
    networks: str
    forces: str
    loss: str

    def describe(self) -> str:
        return (f"descriptor {self.descriptor}, networks {self.networks}, forces {self.forces}, "
                f"loss {self.loss} ({self.device})")


def _available(device: str, activations) -> dict:
    """Which choice of each path can run on ``device`` for networks with ``activations``."""
    fused = choose_kernels(device) == "fused"
    compiled = device == "cpu" and has_kernel("bpnn_nets_forward", device) \
        and act_table.kernel_codes(activations) is not None
    return {
        "descriptor": {"fused": fused, "reference": True},
        "networks": {"compiled": compiled, "torch": True},
        "forces": {"one-node": fused and compiled and has_kernel("bpnn_energy_forces", device),
                   "closed-form": True, "autograd": True},
        "loss": {"compiled": has_kernel("energy_force_loss", device), "torch": True},
    }


def choose(device: str, activations, descriptor: str = "auto", **pinned) -> Plan:
    """The plan for ``device`` (a device type or torch.device): ``descriptor`` 'auto' takes the
    fused kernels where they exist, 'fused' requires them, 'reference' takes pure PyTorch for
    every path; ``pinned`` fixes single paths (an error when one cannot run here)."""
    device = getattr(device, "type", None) or str(device).split(":")[0]
    choose_kernels(device, descriptor)       # checks the request
    avail = _available(device, activations)
    if descriptor == "reference":
        choice = {"descriptor": "reference", "networks": "torch", "forces": "closed-form", "loss": "torch"}
    else:
        choice = {path: next(c for c in options if avail[path][c]) for path, options in CHOICES.items()}
    for path, value in pinned.items():
        if value is None:
            continue
        if path not in CHOICES or value not in CHOICES[path]:
            raise ValueError(f"plan: {path}={value!r} is not one of "
                             f"{CHOICES.get(path, tuple(CHOICES))}")
        if not avail[path][value]:
            raise ConfigError(f"plan: {path} {value} cannot run on {device} with this build and model")
        choice[path] = value
    # the one-node operator contains the fused descriptor and the compiled networks
    if choice["forces"] == "one-node" and (choice["descriptor"] != "fused" or choice["networks"] != "compiled"):
        choice["forces"] = "closed-form"
    return Plan(device=device, **choice)


def replace(plan: Plan, **changes) -> Plan:
    return dataclasses.replace(plan, **changes)
