"""Compiled CPU operators of the per-species networks (csrc/nets_cpu.cpp, distmlip.models.networks
.CompiledNets) against the torch-operator implementations: values, dy/dx, weight and input
gradients of losses on both, every activation, absent species, several atom blocks, float32,
bitwise determinism across thread counts, second derivatives through autograd, gradcheck."""
import pytest
import torch

from distmlip._ext import has_kernel
from distmlip.models import activations as act_table
from distmlip.models import networks as fn
from distmlip.models.networks import make_mlp, net_parameters, species_layout, torch_network_energies

if not has_kernel("bpnn_nets_forward", "cpu"):
    pytest.skip("extension built without the network operators", allow_module_level=True)

ACTS = [["tanh", "tanh"], ["sigmoid", "softplus"], ["silu", "linear"], ["tanh", "silu", "softplus"]]


def _nets(acts, dtype, D=7, T=3, seed=0, scale=4.0):
    torch.manual_seed(seed)
    hidden = [6, 5, 9][:len(acts)]
    nets = [make_mlp(D, hidden, acts, dtype) for _ in range(T)]
    with torch.no_grad():  # weights large enough to reach the curved parts and softplus' linear branch
        for n in nets:
            for p in n.parameters():
                p.mul_(scale)
    return nets


def _loss_and_grads(x, sp, nets, acts, compiled, seed=1, terms=("y", "g")):
    params = [p for n in nets for p in n.parameters()]
    g = torch.Generator().manual_seed(seed)
    y, dydx = fn.nets_with_gradient(x, sp, species_layout(sp, len(nets)), nets, acts, compiled)
    yb = torch.randn(y.shape, dtype=y.dtype, generator=g)
    ub = torch.randn(dydx.shape, dtype=y.dtype, generator=g)
    loss = 0.0
    if "y" in terms:
        loss = loss + (y * yb).sum()
    if "g" in terms:
        loss = loss + (dydx * ub).sum() + 0.5 * (dydx ** 2).sum()
    grads = torch.autograd.grad(loss, params + [x])
    return y.detach(), dydx.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("N,terms", [(1, ("y", "g")), (50, ("y", "g")), (300, ("y", "g")),
                                     (50, ("y",)), (50, ("g",))])
def test_compiled_matches_torch_networks(dtype, acts, N, terms):
    """y, dy/dx and the gradients of a loss on both (weights and inputs) equal the torch path
    (NetsWithGradient, itself tested against autograd) to float64 round-off; species 2 absent;
    300 atoms span three blocks of 128; losses on y only and on dy/dx only (one cotangent None)."""
    nets = _nets(acts, dtype)
    sp = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(N))
    x = torch.randn(N, 7, dtype=dtype, requires_grad=True)
    a = _loss_and_grads(x, sp, nets, acts, True, terms=terms)
    b = _loss_and_grads(x, sp, nets, acts, False, terms=terms)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(a[0], b[0], rtol=0, atol=tol * 10)
    assert torch.allclose(a[1], b[1], rtol=0, atol=tol * 10)
    for ga, gb in zip(a[2], b[2]):
        scale = max(1.0, float(gb.abs().max()))
        assert torch.allclose(ga, gb, rtol=0, atol=tol * scale), (ga - gb).abs().max()
    # the absent species gets exactly zero gradient
    for p in a[2][2 * (len(acts) + 1) * 2:-1]:
        assert float(p.abs().max()) == 0.0


def test_energy_path_and_its_second_derivative():
    """compiled network_energies = the torch operators; gradients of y; and a second derivative through autograd
    (create_graph: the backward recomputes y with torch operators) equals the torch path."""
    acts = ["tanh", "softplus"]
    nets = _nets(acts, torch.float64, scale=2.0)
    sp = torch.tensor([0, 1, 1, 0, 2, 1, 0])
    x = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    params = [p for n in nets for p in n.parameters()]
    res = []
    for compiled in (True, False):
        y = (fn.network_energies(x, sp, nets, acts, True) if compiled
             else torch_network_energies(x, species_layout(sp, 3), net_parameters(nets), acts))
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        loss = (y ** 2).sum() + (gx ** 2).sum()
        res.append([y.detach(), gx.detach()] + list(torch.autograd.grad(loss, params)))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()


def test_gradcheck_compiled_networks():
    acts = ["tanh", "sigmoid"]
    nets = _nets(acts, torch.float64, D=4, scale=1.0)
    params = [p.detach().clone().requires_grad_() for n in nets for p in n.parameters()]
    sp = torch.tensor([0, 2, 1, 0, 2])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    codes = act_table.kernel_codes(acts)

    def f(x, *ps):
        y, g = fn.CompiledNets.apply(x, sp, codes, True, *ps)
        return y, g

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda x, *ps: fn.CompiledNets.apply(x, sp, codes, False, *ps),
                                    (x, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_bitwise_identical_for_any_thread_count():
    acts = ["tanh", "tanh"]
    nets = _nets(acts, torch.float64, scale=1.0)
    N = 700
    sp = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(3))
    x = torch.randn(N, 7, dtype=torch.float64, requires_grad=True)
    old = torch.get_num_threads()
    out = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            out.append(_loss_and_grads(x, sp, nets, acts, True))
    finally:
        torch.set_num_threads(old)
    (y1, g1, w1), (y2, g2, w2) = out
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_higher_derivatives_and_bad_species_raise():
    acts = ["tanh", "tanh"]
    nets = _nets(acts, torch.float64, scale=1.0)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    sp = torch.tensor([0, 1, 2, 0])
    y, g = fn.nets_with_gradient(x, sp, species_layout(sp, 3), nets, acts, True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(g.sum(), x, create_graph=True)
    params = [p for n in nets for p in n.parameters()]
    with pytest.raises(RuntimeError, match="species index 3"):
        torch.ops.distmlip.bpnn_nets_forward(x.detach(), torch.tensor([0, 1, 3, 0]), params, [0, 0], True)


def test_vectorised_tanh_accuracy():
    """The operators' own tanh (csrc/nets_cpu.cpp tanh4) against torch.tanh: at most 4 ulp
    relative over [-30, 30] and tiny arguments, exact +-1 far out, NaN propagates.  Read off a
    1-1-1 network with unit weights: y = tanh(x), dy/dx = 1 - tanh(x)^2."""
    net = make_mlp(1, [1], ["tanh"], torch.float64)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    params = [p.detach() for p in net.parameters()]
    x = torch.cat([torch.linspace(-30, 30, 200001, dtype=torch.float64),
                   torch.logspace(-300, 1.5, 20001, dtype=torch.float64),
                   -torch.logspace(-20, 1.5, 2001, dtype=torch.float64),
                   torch.tensor([0.0, 0.1733, 0.17331, 22.0, 100.0, -1e300], dtype=torch.float64)])
    y, g = torch.ops.distmlip.bpnn_nets_forward(x[:, None], torch.zeros(len(x), dtype=torch.long), params,
                                                [act_table.get("tanh").kernel_code], True)
    ref = torch.tanh(x)
    ulp = (y - ref).abs() / ref.abs().clamp_min(1e-300) / 2.0 ** -52
    assert float(ulp.max()) <= 4.0, float(x[ulp.argmax()])
    assert torch.allclose(g[:, 0], 1 - ref * ref, rtol=0, atol=4e-16)
    assert y[-2] == 1.0 and y[-1] == -1.0
    yn, _ = torch.ops.distmlip.bpnn_nets_forward(torch.tensor([[float("nan")]], dtype=torch.float64),
                                                 torch.zeros(1, dtype=torch.long), params, [0], True)
    assert torch.isnan(yn).all()
