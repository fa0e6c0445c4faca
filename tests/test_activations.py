"""The activation table (distmlip.models.activations) is the one list: the C++ kernels' enum
agrees with it, each entry's derivatives are those of its function, and its torch layer computes
its function."""
import re
from pathlib import Path

import pytest
import torch

from distmlip.models import activations as act_table

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "nets_cpu.cpp"


def _cpp_enum() -> dict:
    text = CSRC.read_text()
    body = re.search(r"enum ActCode : int64_t \{([^}]*)\}", text).group(1)
    out = {}
    for item in body.split(","):
        name, value = (x.strip() for x in item.split("="))
        out[name] = int(value)
    return out


def test_cpp_enum_matches_the_table():
    enum = _cpp_enum()
    codes = {f"k{a.name.capitalize()}": a.kernel_code for a in act_table.ACTIVATIONS.values()
             if a.kernel_code is not None}
    assert {k: v for k, v in enum.items() if k != "kNumActivations"} == codes
    assert enum["kNumActivations"] == max(codes.values()) + 1
    # every kernel code has its case in the block activation routine
    text = CSRC.read_text()
    for name in codes:
        assert f"case {name}:" in text, name


@pytest.mark.parametrize("name", list(act_table.ACTIVATIONS))
def test_derivatives_and_layer_match_the_function(name):
    act = act_table.ACTIVATIONS[name]
    # (not through softplus' threshold 20 itself, where torch's own double backward is one-sided)
    a = torch.linspace(-25.0, 25.0, 2000, dtype=torch.float64, requires_grad=True)
    h, d1, d2 = act.derivatives(a)
    f = act.function(a)
    (g1,) = torch.autograd.grad(f.sum(), a, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), a) if g1.requires_grad else (torch.zeros_like(a),)
    torch.testing.assert_close(h, f, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(d1, g1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d2, g2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(act.module()(a), f, rtol=0, atol=0)


def test_codes_are_unique_and_lookups_work():
    acts = list(act_table.ACTIVATIONS.values())
    kc = [a.kernel_code for a in acts if a.kernel_code is not None]
    ac = [a.aenet_code for a in acts if a.aenet_code is not None]
    assert len(set(kc)) == len(kc) and len(set(ac)) == len(ac)
    assert act_table.by_aenet_code(1).name == "tanh" and act_table.by_kernel_code(0).name == "tanh"
    assert act_table.kernel_codes(["tanh", "sigmoid"]) == (0, 1)
    with pytest.raises(Exception, match="not one of"):
        act_table.get("relu6")
