"""The plan: which implementation runs for a model on a device, chosen in one place
(distmlip.models.backend) from what the extension registered for the device."""
import pytest
import torch

from distmlip import _ext
from distmlip.errors import ConfigError
from distmlip.models import backend
from distmlip.models.bpnn import BPNN

DESC = {"rc_radial": 4.0, "n_radial": 4, "rc_angular": 3.0, "n_angular": 2}


def test_kernels_are_asked_of_the_dispatcher():
    assert _ext.has_kernel("no_such_operator", "cpu") is False
    if _ext.load_extension(warn_if_missing=False):
        assert _ext.has_kernel("chebyshev_forward", "cpu") is True
    # a device type the extension cannot have kernels for
    assert _ext.has_kernel("chebyshev_forward", "mps") is False
    built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("distmlip::chebyshev_forward", "CUDA") \
        if _ext.has_kernel("chebyshev_forward", "cpu") else False
    assert _ext.has_kernel("chebyshev_forward", "cuda") == (built_with_cuda and torch.cuda.is_available())


@pytest.mark.skipif(not _ext.has_kernel("bpnn_energy_forces", "cpu"), reason="compiled extension missing")
def test_cpu_plan_takes_the_fastest_paths_and_reference_takes_pure_torch():
    p = backend.choose("cpu", ["tanh", "tanh"])
    assert (p.descriptor, p.networks, p.forces, p.loss) == ("fused", "compiled", "one-node", "compiled")
    r = backend.choose("cpu", ["tanh"], "reference")
    assert (r.descriptor, r.networks, r.forces, r.loss) == ("reference", "torch", "closed-form", "torch")
    assert "descriptor fused" in p.describe() and "(cpu)" in p.describe()


def test_cuda_torch_with_cpu_only_extension_falls_back(monkeypatch):
    """A CUDA device whose kernels the extension lacks: every path falls back to torch instead
    of failing at dispatch; asking for the fused kernels there is a clear error."""
    monkeypatch.setattr(_ext, "_KERNELS", {(op, "cuda"): False for op in
                                           ("chebyshev_forward", "bpnn_nets_forward", "bpnn_energy_forces",
                                            "energy_force_loss")})
    p = backend.choose("cuda", ["tanh"])
    assert (p.descriptor, p.networks, p.forces, p.loss) == ("reference", "torch", "closed-form", "torch")
    with pytest.raises(ConfigError, match="no cuda kernels"):
        backend.choose("cuda", ["tanh"], "fused")


def test_gpu_plan_of_a_cuda_build_with_the_declared_cpu_only_operators(monkeypatch):
    """A CUDA build has CUDA kernels for every operator but those of _ext.CPU_ONLY_OPS (what `make
    cuda-build-check` verifies): on a GPU the plan then runs the fused CUDA descriptor with the
    torch networks, closed-form forces and the torch loss."""
    ops = ("chebyshev_forward", "bpnn_nets_forward", "bpnn_energy_forces", "energy_force_loss")
    monkeypatch.setattr(_ext, "_KERNELS", {(op, "cuda"): op not in _ext.CPU_ONLY_OPS for op in ops})
    p = backend.choose("cuda", ["tanh", "tanh"])
    assert (p.descriptor, p.networks, p.forces, p.loss) == ("fused", "torch", "closed-form", "torch")
    with pytest.raises(ConfigError, match="forces one-node cannot run on cuda"):
        backend.choose("cuda", ["tanh"], forces="one-node")


@pytest.mark.skipif(not _ext.load_extension(warn_if_missing=False), reason="compiled extension missing")
def test_declared_cpu_only_operators_exist_in_the_build():
    """Every operator _ext.CPU_ONLY_OPS names is one the (CPU) build registers, and each with a
    reason: the list cannot silently keep a renamed or removed operator."""
    ops = _ext.registered_ops("CPU")
    assert "chebyshev_forward" in ops
    assert set(_ext.CPU_ONLY_OPS) <= set(ops), set(_ext.CPU_ONLY_OPS) - set(ops)
    assert all(isinstance(why, str) and why for why in _ext.CPU_ONLY_OPS.values())
    assert "chebyshev_forward" not in _ext.CPU_ONLY_OPS   # the descriptor kernels have CUDA kernels


@pytest.mark.skipif(not _ext.load_extension(warn_if_missing=False), reason="compiled extension missing")
def test_every_cpu_operator_has_a_cuda_kernel_in_the_sources_or_is_declared_cpu_only():
    """What `make cuda-build-check` holds a CUDA build to, checked here on a CPU build from the
    sources: each operator with a CPU kernel is registered for CUDA in csrc/ or named in
    CPU_ONLY_OPS, and none is both.  Without it a new CPU operator passes `make test` and fails
    only the (slow, CI-only) CUDA build check."""
    import pathlib
    import re

    csrc = pathlib.Path(_ext.__file__).resolve().parent.parent / "csrc"
    if not csrc.is_dir():
        pytest.skip("csrc/ not beside the package (installed copy)")
    cuda_ops = set()
    for src in csrc.glob("*.cpp"):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(distmlip,\s*CUDA,\s*m\)\s*\{(.*?)\}", src.read_text(), re.S):
            cuda_ops |= set(re.findall(r'm\.impl\("(\w+)"', block))
    assert cuda_ops, "no CUDA registrations found in csrc/ (the pattern no longer matches the sources)"
    cpu_ops = set(_ext.registered_ops("CPU"))
    undeclared = cpu_ops - cuda_ops - set(_ext.CPU_ONLY_OPS)
    assert not undeclared, f"CPU operators with neither a CUDA kernel nor a CPU_ONLY_OPS entry: {sorted(undeclared)}"
    both = cuda_ops & set(_ext.CPU_ONLY_OPS)
    assert not both, f"declared CPU-only but registered for CUDA: {sorted(both)}"


@pytest.mark.skipif(not _ext.has_kernel("bpnn_nets_forward", "cpu"), reason="compiled extension missing")
def test_activation_without_kernel_runs_torch_networks(monkeypatch):
    from distmlip.models import activations as act_table

    silu = act_table.ACTIVATIONS["silu"]
    monkeypatch.setitem(act_table.ACTIVATIONS, "silu", act_table.Activation(
        "silu", silu.module, silu.function, silu.derivatives, kernel_code=None, aenet_code=None))
    p = backend.choose("cpu", ["tanh", "silu"])
    assert p.networks == "torch" and p.forces == "closed-form"
    with pytest.raises(ConfigError, match="networks compiled cannot run"):
        backend.choose("cpu", ["tanh", "silu"], networks="compiled")


def test_model_keeps_one_plan_per_device_and_pins_paths():
    m = BPNN(["Cu"], DESC, hidden=[4])
    p1 = m.plan()
    assert m.plan() is p1 and m.plan("cpu") is p1
    p2 = m.set_plan(forces="autograd", networks="torch")
    assert p2.forces == "autograd" and p2.networks == "torch" and m.plan() is p2
    assert m.set_plan(forces=None, networks=None) == p1
    with pytest.raises(ValueError, match="forces"):
        m.set_plan(forces="magic")
    with pytest.raises(ConfigError, match="backend"):
        BPNN(["Cu"], DESC, hidden=[4], backend="gpu")
