"""The activation functions of the per-element networks: ONE table that every path reads.

An entry holds everything a path needs to know about one function: the torch layer the networks
are built with, the value with its first and second derivatives (closed-form force training,
:class:`distmlip.models.networks.NetsWithGradient`), the code of its kernel in the compiled CPU
networks (``enum ActCode`` in csrc/nets_cpu.cpp; ``None`` when the kernels lack it, then the
torch operators run and the backend line says so), and aenet's code for it in ``.nn`` files
(``None``: aenet has no such function and the aenet export refuses the model).

Adding an activation: one entry here and, for the compiled networks, one ``case`` in
``block_activation`` of csrc/nets_cpu.cpp with the same code (tests/test_activations.py checks
that the C++ enum and this table agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

Derivatives = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Activation:
    name: str
    module: Callable[[], nn.Module]          # the layer in the networks (state-dict free)
    function: Callable[[torch.Tensor], torch.Tensor]
    derivatives: Derivatives                 # a -> (s(a), s'(a), s''(a))
    kernel_code: Optional[int]               # csrc/nets_cpu.cpp ActCode
    aenet_code: Optional[int]                # aenet's f_a in .nn files


def _tanh(a):
    h = torch.tanh(a)
    d1 = 1.0 - h * h
    return h, d1, -2.0 * h * d1


def _sigmoid(a):
    h = torch.sigmoid(a)
    d1 = h * (1.0 - h)
    return h, d1, d1 * (1.0 - 2.0 * h)


def _linear(a):
    return a, torch.ones_like(a), torch.zeros_like(a)


def _softplus(a):
    # torch's nn.Softplus (beta 1) is linear above its threshold of 20; the derivatives follow it
    s = torch.sigmoid(a)
    lin = a > 20.0
    return (F.softplus(a), torch.where(lin, torch.ones_like(a), s),
            torch.where(lin, torch.zeros_like(a), s * (1.0 - s)))


# aenet's scaled tanh (LeCun et al., "Efficient BackProp"; aenet src/ext/feedforward.f90 ff_activate,
# codes 3 and 4), with aenet's constants as written there (B is 2/3 rounded to 15 digits)
MTANH_A = 1.7159
MTANH_B = 0.666666666666667
TWIST_C = 0.1


def _mtanh_fn(a):
    return MTANH_A * torch.tanh(MTANH_B * a)


def _twist_fn(a):
    return MTANH_A * torch.tanh(MTANH_B * a) + TWIST_C * a


def _mtanh(a):
    h = torch.tanh(MTANH_B * a)
    s = 1.0 - h * h
    return MTANH_A * h, (MTANH_A * MTANH_B) * s, (-2.0 * MTANH_A * MTANH_B * MTANH_B) * h * s


def _twist(a):
    y, d1, d2 = _mtanh(a)
    return y + TWIST_C * a, d1 + TWIST_C, d2


class MTanh(nn.Module):
    """aenet's 'mtanh': 1.7159 tanh(2/3 x)."""

    def forward(self, x):
        return _mtanh_fn(x)


class Twist(nn.Module):
    """aenet's 'twist': 1.7159 tanh(2/3 x) + 0.1 x."""

    def forward(self, x):
        return _twist_fn(x)


def _silu(a):
    s = torch.sigmoid(a)
    return (a * s, s * (1.0 + a * (1.0 - s)), s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s)))


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("tanh", nn.Tanh, torch.tanh, _tanh, kernel_code=0, aenet_code=1),
    Activation("sigmoid", nn.Sigmoid, torch.sigmoid, _sigmoid, kernel_code=1, aenet_code=2),
    Activation("linear", nn.Identity, lambda a: a, _linear, kernel_code=2, aenet_code=0),
    Activation("softplus", nn.Softplus, F.softplus, _softplus, kernel_code=3, aenet_code=None),
    Activation("silu", nn.SiLU, F.silu, _silu, kernel_code=4, aenet_code=None),
    Activation("mtanh", MTanh, _mtanh_fn, _mtanh, kernel_code=None, aenet_code=3),
    Activation("twist", Twist, _twist_fn, _twist, kernel_code=None, aenet_code=4),
)}


def get(name: str, where: str = "model.activation") -> Activation:
    """The table entry of ``name``; a ConfigError listing the known names otherwise."""
    act = ACTIVATIONS.get(name)
    if act is None:
        raise ConfigError(f"{where}: {name!r} is not one of {', '.join(ACTIVATIONS)}")
    return act


def by_kernel_code(code: int) -> Activation:
    for a in ACTIVATIONS.values():
        if a.kernel_code == code:
            return a
    raise KeyError(f"no activation with kernel code {code}")


def by_aenet_code(code: int) -> Optional[Activation]:
    """The activation aenet writes as ``code`` in .nn files, or None when distmlip lacks it."""
    for a in ACTIVATIONS.values():
        if a.aenet_code == code:
            return a
    return None


def kernel_codes(names) -> Optional[tuple[int, ...]]:
    """Kernel codes of the activations ``names``, or None when one of them has no kernel."""
    codes = tuple(ACTIVATIONS[n].kernel_code for n in names)
    return None if any(c is None for c in codes) else codes
