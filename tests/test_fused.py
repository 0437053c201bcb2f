"""kd.fused: k PreResNets as one fused network compute what k separate PreResNets compute.

* float64, 24 free-running SGD steps (Nesterov, weight decay, a changing lr, each member its own batches and
  loss, the summed losses backpropagated once, the pack unfused and fused again half-way) of k = 1, 2, 3
  basic-block (preresnet8) and bottleneck (preresnet47) members: logits, weights, BatchNorm running statistics
  and counts, momentum buffers and eval-mode logits equal k separate runs to 1e-9.
* float32 and bf16 autocast, NCHW and channels_last: 20 steps, each from the separate runs' state, within
  rounding bounds derived from the dtype and the size of the computation (:func:`bounds`).
* The weight and optimizer mapping round-trips bitwise; the shared-input ensemble forward equals the members';
  the forward compiles as one graph; what cannot fuse says so.

Why float32 runs are compared step by step and not over a free-running trajectory: a ReLU's derivative jumps
at 0, so where a pre-activation lies within rounding of 0 (thousands of them a step here), a last-bit
difference switches one term of a gradient sum on or off, and over a few steps the training dynamics amplify
that into differences of order one. Two *separate* float32 runs whose convolutions sum in another order
(another CPU, another thread count) diverge the same way (measured: preresnet47 float32 against float64
differed by O(1) within 5 steps). So exactness over a trajectory is checked in float64, where such a
switch needs a pre-activation within 1e-16 of 0, and the float32 and bf16 kernels step by step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.fused import (
    FusedBatchNorm2d,
    FusedConv2d,
    FusedLinear,
    FusedPreResNet,
    can_fuse,
    check_fusable,
    fuse_optimizer,
    unfuse_optimizer_into,
)
from kd.models import Bottleneck, build_model
from tests.conftest import float_tol

ARCHS = {"preresnet8": 8, "preresnet47": 8}  # basic blocks; bottleneck blocks (n = 5 a stage), at 8x8 pixels
BATCH, CLASSES = 16, 10  # 16: the CPU runs 1x1 convolutions through oneDNN from batch 16 on, as in training
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@contextlib.contextmanager
def torch_threads(n: int):
    """n torch threads inside. Numerical equality is checked at 1 thread and, for the basic-block network, at 2
    too (a sum split between threads in another order; in make chaos: on a loaded 2-core machine two threads
    ran these steps 5-20x slower than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def members(arch: str, k: int, dtype=torch.float32, channels_last: bool = False) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        m = build_model(arch, CLASSES).to(dtype)
        out.append(m.to(memory_format=torch.channels_last) if channels_last else m)
    return out


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **SGD)


def lr_at(step: int, steps: int) -> float:  # cosine, a different lr every step
    return 0.005 + (SGD["lr"] - 0.005) * (1 + math.cos(math.pi * step / steps)) / 2


def set_lr(optimizers, lr: float) -> None:
    for opt in optimizers:
        opt.param_groups[0]["lr"] = lr


def soft_ce(logits, target_logits):
    return F.cross_entropy(logits, target_logits.softmax(-1))  # a distillation loss, in the input's dtype


def batches(g: torch.Generator, k: int, hw: int, dtype) -> tuple[list, list]:
    xs = [torch.randn(BATCH, 3, hw, hw, generator=g, dtype=dtype) for _ in range(k)]  # each member its own
    ts = [torch.randn(BATCH, CLASSES, generator=g, dtype=dtype) * 3 for _ in range(k)]
    return xs, ts


def momentum(opt, model) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"] for p in model.parameters()]


# --------------------------------------------------------------------------------------- float64: exact


@pytest.mark.parametrize("arch,k,n_threads", [*((arch, k, 1) for arch in ARCHS for k in (1, 2, 3)),
                                              pytest.param("preresnet8", 3, 2, marks=pytest.mark.slow)])
def test_fused_training_equals_separate_runs_float64(arch, k, n_threads):
    with torch_threads(n_threads):
        free_trajectory_float64(arch, k)


def free_trajectory_float64(arch: str, k: int) -> None:
    steps, hw, atol = 24, ARCHS[arch], 1e-9
    plain = members(arch, k, torch.float64)
    packed = copy.deepcopy(plain)
    plain_opts, packed_opts = [sgd(m) for m in plain], [sgd(m) for m in packed]
    fused = FusedPreResNet.from_members(packed)
    opt = fuse_optimizer(fused, packed, packed_opts)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        if step == steps // 2:  # back into the members, then a new fused network from their stepped state
            fused.to_members(packed)
            unfuse_optimizer_into(fused, opt, packed, packed_opts)
            fused = FusedPreResNet.from_members(packed)
            opt = fuse_optimizer(fused, packed, packed_opts)
        set_lr([opt, *plain_opts], lr_at(step, steps))
        xs, ts = batches(g, k, hw, torch.float64)
        logits = fused(torch.stack(xs))
        sum(soft_ce(z, t) for z, t in zip(logits, ts)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for i, (model, o, x, t) in enumerate(zip(plain, plain_opts, xs, ts)):
            z = model(x)
            assert torch.allclose(logits[i], z, rtol=0, atol=atol), (step, i, (logits[i] - z).abs().max())
            soft_ce(z, t).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    fused.to_members(packed)
    unfuse_optimizer_into(fused, opt, packed, packed_opts)
    for a, b, oa, ob in zip(packed, plain, packed_opts, plain_opts):
        sa, sb = a.state_dict(), b.state_dict()
        for key in sb:  # weights, BatchNorm running mean, variance and count
            assert torch.allclose(sa[key], sb[key], rtol=0, atol=atol), (key, (sa[key] - sb[key]).abs().max())
        assert all(int(sa[key]) == steps for key in sa if key.endswith("num_batches_tracked"))
        assert any("running_var" in key and not torch.equal(sb[key], torch.ones_like(sb[key])) for key in sb)
        for ma, mb in zip(momentum(oa, a), momentum(ob, b)):
            assert torch.allclose(ma, mb, rtol=0, atol=atol)
        assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    x = torch.randn(k, BATCH, 3, hw, hw, dtype=torch.float64)
    fused.eval()
    expected = torch.stack([m.eval()(xi) for m, xi in zip(plain, x)])
    assert torch.allclose(fused(x), expected, rtol=0, atol=atol)
    if arch == "preresnet47":
        assert isinstance(plain[0].layer1[0], Bottleneck)


# ------------------------------------------------------------------------------- float32 and bf16: bounded

LAMBDA = 2.0  # confidence multiple of the sqrt(R) growth of independent bf16 roundings (below)


def bounds(model: nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """(forward, backward): bounds on the relative L2 difference between a fused and a separate member's
    logits (forward; also BatchNorm statistics) and gradients (backward) in one step, derived as follows.

    No operation of the fused network mixes members (a grouped convolution's output channel sums over its own
    member's input channels, BatchNorm is per channel, the head one matmul per member), so each value is the
    same sum of the same terms as in the separate member, summed in another order; k does not enter.
    A dot product of n terms summed in any order is within gamma_n ~ n*u of the exact one (u = eps/2,
    Higham, Accuracy and Stability of Numerical Algorithms, Thm 3.1), so two orders differ by 2*n*u. Through
    a network of BatchNorm-normalised layers (gain ~1 each) the layers' relative errors add:
    forward <= 2u * the sum of n over the layers (:func:`tests.conftest.float_tol` of that sum): a
    convolution's Cin*kh*kw, the head's in_features, and BatchNorm's mean and variance, 2 sums over B*H*W.
    A gradient adds the backward sums: a convolution's input gradient (Cout*kh*kw terms), its weight gradient
    (B*H'*W'), BatchNorm's two sums, the head's.
    Under bf16 autocast the sums still accumulate in float32, and each layer's output is then rounded to
    bf16 (u16 = eps(bf16)/2): where the two float32 values straddle a rounding boundary the bf16 results
    differ by one unit in the last place, 2*u16. Over the R rounding stages of a forward (convolutions,
    BatchNorms, residual additions, pooling, head), these one-ulp differences are independent, so they add in
    quadrature (the probabilistic rounding analysis of Higham and Mary, 2019): LAMBDA * 2*u16 * sqrt(R),
    and a gradient's 3R stages (forward, input gradient, weight gradient) LAMBDA * 2*u16 * sqrt(3R).
    """
    n = {"fwd": 0, "bwd": 0, "stages": 1}  # 1: the mean pooling

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            taps = m.kernel_size[0] * m.kernel_size[1]
            n["fwd"] += m.in_channels // m.groups * taps
            n["bwd"] += m.out_channels * taps + out.shape[0] * out.shape[2] * out.shape[3]
        elif isinstance(m, nn.BatchNorm2d):
            n["fwd"] += 2 * out.numel() // out.shape[1]
            n["bwd"] += 2 * out.numel() // out.shape[1]
        elif isinstance(m, nn.Linear):
            n["fwd"] += m.in_features
            n["bwd"] += m.out_features + out.shape[0]
        n["stages"] += 1  # a layer's output, or a block's residual addition

    probe = copy.deepcopy(model)
    for m in probe.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) or type(m).__name__ in ("BasicBlock", "Bottleneck"):
            m.register_forward_hook(hook)
    with torch.no_grad():
        probe(x)
    forward = float_tol(torch.float32, n["fwd"])  # n * eps = 2 * n * u
    backward = float_tol(torch.float32, n["fwd"] + n["bwd"])
    if bf16:
        u16 = torch.finfo(torch.bfloat16).eps / 2
        forward += LAMBDA * 2 * u16 * math.sqrt(n["stages"])
        backward += LAMBDA * 2 * u16 * math.sqrt(3 * n["stages"])
    return forward, backward


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


MODES = {"float32": (False, False), "float32-channels_last": (False, True), "bf16": (True, False),
         "bf16-channels_last": (True, True)}  # (bf16 autocast, channels_last)


# every mode at k = 3; at k = 1 and 2 the two ends, float32 NCHW and bf16 channels_last (the GPU's layout); one
# torch thread, and two for the basic-block network's k = 3 in float32 (where the order of a sum shows most).
# make test runs the ends of preresnet8 and preresnet47 at k = 3 at one thread; make chaos the rest too.
ENDS = ("float32", "bf16-channels_last")


def step_cases():
    for arch in ARCHS:
        for k in (1, 2, 3):
            for mode in MODES:
                for n in (1, 2) if (arch, k, mode) == ("preresnet8", 3, "float32") else (1,):
                    fast = n == 1 and mode in ENDS and (arch == "preresnet8" or k == 3)
                    if k == 3 or mode in ENDS:
                        yield pytest.param(arch, k, mode, n, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("arch,k,mode,n_threads", list(step_cases()))
def test_fused_steps_within_rounding_bounds(arch, k, mode, n_threads):
    """20 steps, each from the separate runs' state: the fused forward (logits, BatchNorm statistics, eval
    logits) within the forward bound at every step, its gradients within the backward bound at the median
    member-step (a step where a pre-activation lies within rounding of 0 differs by a ReLU's switched term),
    and its SGD step, given the same gradients, the members' SGD steps to a few units of roundoff."""
    with torch_threads(n_threads):
        steps_within_bounds(arch, k, mode)


def steps_within_bounds(arch: str, k: int, mode: str) -> None:
    bf16, channels_last = MODES[mode]
    steps, hw = 20, ARCHS[arch]
    plain = members(arch, k, torch.float32, channels_last)
    opts = [sgd(m) for m in plain]
    forward_tol, backward_tol = bounds(plain[0], torch.zeros(BATCH, 3, hw, hw), bf16)
    g = torch.Generator().manual_seed(0)
    grad_errors = []
    for step in range(steps):
        set_lr(opts, lr_at(step, steps))
        fused = FusedPreResNet.from_members(plain)  # this step starts from the separate runs' state
        opt = fuse_optimizer(fused, plain, opts)
        assert fused.channels_last == channels_last
        xs, ts = batches(g, k, hw, torch.float32)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = fused(xs)
            sum(soft_ce(z, t) for z, t in zip(logits, ts)).backward()
            separate = [m(x) for m, x in zip(plain, xs)]
            sum(soft_ce(z, t) for z, t in zip(separate, ts)).backward()
        for i, (model, z) in enumerate(zip(plain, separate)):
            assert logits[i].dtype == z.dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert rel(logits[i], z) <= forward_tol, (step, i, rel(logits[i], z), forward_tol)
            stats = [(fused.member_view(n, b)[i], b2) for (n, b), b2 in zip(fused.named_buffers(), model.buffers())]
            running = [(a, b) for a, b in stats if a.is_floating_point()]
            assert rel(flat(a for a, _ in running), flat(b for _, b in running)) <= forward_tol
            assert all(torch.equal(a, b) for a, b in stats if not a.is_floating_point())
            grad_errors.append(rel(flat(fused.member_view(n, p.grad)[i] for n, p in fused.named_parameters()),
                                   flat(p.grad for p in model.parameters())))
        check_sgd_step(fused, opt, plain, opts)
        if step % 4:
            continue
        fused.eval()
        x = torch.randn(k, BATCH, 3, hw, hw, generator=g)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            fused_eval, expected = fused(x), [m.eval()(xi) for m, xi in zip(plain, x)]
        assert all(rel(a, b) <= forward_tol for a, b in zip(fused_eval, expected))
        for m in plain:
            m.train()
    assert statistics.median(grad_errors) <= backward_tol, (sorted(grad_errors), backward_tol)


def check_sgd_step(fused, opt, plain, opts) -> None:
    """The fused SGD step given the members' own gradients is their SGD steps: SGD's four elementwise
    operations (weight decay, momentum, Nesterov, the update) round once each, twice where one side fuses a
    multiply-add that the other rounds in two, so the results differ by at most 2*4*u of the operands' size."""
    u, sizes = torch.finfo(torch.float32).eps / 2, []
    for i, (model, o) in enumerate(zip(plain, opts)):
        for (name, p), q in zip(fused.named_parameters(), model.parameters()):
            fused.member_view(name, p.grad)[i].copy_(q.grad)
        size = flat(model.parameters()).abs() + flat(q.grad for q in model.parameters()).abs()
        if o.state:
            size += flat(momentum(o, model)).abs()
        sizes.append(8 * u * size)
    for o in (opt, *opts):
        o.step()
        o.zero_grad(set_to_none=True)
    for i, (model, o, size) in enumerate(zip(plain, opts, sizes)):
        mine = flat(fused.member_view(n, p)[i] for n, p in fused.named_parameters())
        assert ((mine - flat(model.parameters())).abs() <= size).all()
        mine = flat(fused.member_view(n, opt.state[p]["momentum_buffer"])[i] for n, p in fused.named_parameters())
        assert ((mine - flat(momentum(o, model))).abs() <= size).all()


# ------------------------------------------------------------------------------ mapping, ensembles, compile


def test_from_members_to_members_round_trip_is_bitwise(one_thread):
    plain = members("preresnet8", 3, channels_last=True)
    for i, m in enumerate(plain):  # distinct running statistics and a count of 5, as after 5 steps
        for name, b in m.named_buffers():
            b.copy_(torch.full_like(b, 5) if name.endswith("num_batches_tracked") else torch.rand_like(b) + i)
    fused = FusedPreResNet.from_members(plain)
    assert fused.channels_last and fused.k == 3 and fused.training
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain[0].named_parameters()]
    assert list(fused.state_dict()) == list(plain[0].state_dict())
    assert fused.layer1[0].conv1.weight.shape == (3 * 16, 16, 3, 3) and fused.layer1[0].conv1.groups == 3
    assert fused.layer1[0].bn1.running_mean.shape == (3 * 16,) and fused.fc.weight.shape == (3, 64, CLASSES)
    for i, m in enumerate(plain):
        own = fused.member_state_dict(i)
        assert all(torch.equal(own[key], v) for key, v in m.state_dict().items())
    fresh = members("preresnet8", 3, channels_last=True)
    fused.to_members(fresh)
    for a, b in zip(fresh, plain):
        assert all(torch.equal(v, b.state_dict()[key]) for key, v in a.state_dict().items())
        assert a.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_fresh_fused_network_is_k_fresh_members(one_thread):
    torch.manual_seed(0)
    fused = FusedPreResNet(47, CLASSES, 2, dtype=torch.float64)
    plain = members("preresnet47", 2, torch.float64)
    fused.to_members(plain)
    x = torch.randn(2, BATCH, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(fused(x), torch.stack([m(xi) for m, xi in zip(plain, x)]), rtol=0, atol=1e-9)
    for i in range(2):  # PreResNet's and nn.Linear's initialisation, each member on its own
        own = fused.member_state_dict(i)
        w = own["layer3.0.conv2.weight"]  # 64 filters of 64 x 3 x 3: std sqrt(2 / (9 * 64))
        assert abs(float(w.std()) / math.sqrt(2 / (9 * 64)) - 1) < 0.05
        assert float(own["fc.weight"].abs().max()) <= 1 / math.sqrt(own["fc.weight"].shape[1])
        assert torch.equal(own["bn.weight"], torch.ones(256, dtype=torch.float64))
        assert int(own["bn.num_batches_tracked"]) == 1  # the forward above


def test_optimizer_state_round_trip_is_bitwise(one_thread):
    plain = members("preresnet8", 2)
    opts = [sgd(m) for m in plain]
    fused = FusedPreResNet.from_members(plain)
    opt = fuse_optimizer(fused, plain, opts)
    assert not opt.state  # no member has stepped: no momentum yet
    for m, o in zip(plain, opts):
        m(torch.randn(4, 3, 8, 8)).square().mean().backward()
        o.step()
        o.param_groups[0]["lr"] = 0.01
    opt = fuse_optimizer(fused, plain, opts)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["nesterov"]
    opt.param_groups[0]["lr"] = 0.02
    copies = copy.deepcopy(plain)
    copy_opts = [sgd(m) for m in copies]
    unfuse_optimizer_into(fused, opt, copies, copy_opts)
    for m, o, c, co in zip(plain, opts, copies, copy_opts):
        assert all(torch.equal(a, b) for a, b in zip(momentum(o, m), momentum(co, c)))
        assert co.param_groups[0]["lr"] == 0.02
    accelerated = type("Wrapped", (), {"optimizer": opts[0]})()  # Accelerate's wrapper holds the optimizer
    assert fuse_optimizer(FusedPreResNet.from_members(plain[:1]), plain[:1], [accelerated]).state


def test_what_cannot_fuse_says_so(one_thread):
    assert can_fuse("preresnet56") and can_fuse("preresnet8") and not can_fuse("timm:resnet18")
    with pytest.raises(KDError, match="cannot be fused"):
        check_fusable("timm:resnet18")
    with pytest.raises(KDError, match="only preresnet members fuse"):
        FusedPreResNet.from_members([nn.Sequential(nn.Conv2d(3, 4, 3))])
    with pytest.raises(ValueError, match="one depth and class count"):
        FusedPreResNet.from_members([build_model("preresnet8", 10), build_model("preresnet14", 10)])
    with pytest.raises(ValueError, match="one depth and class count"):
        FusedPreResNet.from_members([build_model("preresnet8", 10), build_model("preresnet8", 5)])
    stepped = members("preresnet8", 2)
    stepped[1].train()(torch.randn(4, 3, 8, 8))  # one member's BatchNorms counted a batch more
    with pytest.raises(ValueError, match="num_batches_tracked differs"):
        FusedPreResNet.from_members(stepped)
    plain = members("preresnet8", 2)
    fused = FusedPreResNet.from_members(plain)
    with pytest.raises(ValueError, match="only SGD"):
        fuse_optimizer(fused, plain, [torch.optim.Adam(m.parameters()) for m in plain])
    with pytest.raises(ValueError, match="same hyperparameters"):
        fuse_optimizer(fused, plain, [sgd(plain[0]), torch.optim.SGD(plain[1].parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="its own model"):
        fuse_optimizer(fused, plain, [sgd(plain[1]), sgd(plain[0])])
    with pytest.raises(ValueError, match=r"expected inputs \[k=2"):
        fused(torch.zeros(3, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="expected 2 batches"):
        fused([torch.zeros(4, 3, 8, 8)])
    with pytest.raises(ValueError, match="batches differ in shape"):
        fused([torch.zeros(4, 3, 8, 8), torch.zeros(3, 3, 8, 8)])


@pytest.mark.parametrize("arch,n_threads", [("preresnet8", 1), ("preresnet8", 2), ("preresnet47", 1)])
def test_fused_member_logits_are_the_members_on_one_batch(arch, n_threads):
    with torch_threads(n_threads):
        shared_batch(arch)


def shared_batch(arch: str) -> None:
    """A teacher ensemble: one batch for every member, eval mode, as ``torch.stack([m(x) for m in members])``."""
    plain = members(arch, 3, torch.float64)
    for m in plain:  # trained-like running statistics
        with torch.no_grad():
            m.train()(torch.randn(16, 3, 8, 8, dtype=torch.float64))
        m.eval()
    fused = FusedPreResNet.from_members(plain)
    assert not fused.training
    x = torch.randn(BATCH, 3, ARCHS[arch], ARCHS[arch], dtype=torch.float64)
    with torch.no_grad():
        out, expected = fused.fused_member_logits(x), torch.stack([m(x) for m in plain])
    assert out.shape == (3, BATCH, CLASSES)
    assert torch.allclose(out, expected, rtol=0, atol=1e-9), (out - expected).abs().max()
    plain32 = [m.float().to(memory_format=torch.channels_last) for m in plain]
    fused32 = FusedPreResNet.from_members(plain32)
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    forward_tol, _ = bounds(plain32[0], x32, bf16=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out, expected = fused32.fused_member_logits(x32), [m(x32) for m in plain32]
    assert out.dtype == torch.bfloat16 and all(rel(a, b) <= forward_tol for a, b in zip(out, expected))


def test_bf16_autocast_keeps_every_activation_in_bf16(one_thread):
    """Convolutions, BatchNorms (bf16 in, float32 parameters) and the head all return bf16 under autocast."""
    fused = FusedPreResNet.from_members(members("preresnet47", 2, channels_last=True))
    dtypes = {}
    for name, m in fused.named_modules():
        if isinstance(m, (FusedConv2d, FusedBatchNorm2d, FusedLinear)):
            m.register_forward_hook(lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        fused(torch.randn(2, 4, 3, 8, 8)).float().sum().backward()
    assert len(dtypes) == 15 * (3 + 3) + 3 + 3  # 15 blocks of 3 convolutions and 3 BatchNorms, 3 shortcuts,
    # the stem, the last BatchNorm and the head
    assert set(dtypes.values()) == {torch.bfloat16}
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters())


def test_forward_compiles_as_one_graph(one_thread):
    """No graph break in the training forward (a [k, B, ...] tensor or a list of batches, channels_last, bf16
    autocast) nor in the ensemble forward (``torch.compile(dynamic=False)`` traces one graph each)."""
    fused = FusedPreResNet.from_members(members("preresnet8", 3, channels_last=True))
    x = torch.randn(3, 4, 3, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        for inputs in (x, list(x)):
            explained = torch._dynamo.explain(fused)(inputs)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    fused.eval()
    explained = torch._dynamo.explain(fused.fused_member_logits)(x[0])
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_compiled_fused_step_equals_eager(one_thread):
    """``torch.compile(dynamic=False)`` of the fused network (inductor on the CPU): the same logits and
    gradients as eager, within the float32 bounds."""
    plain = members("preresnet8", 2)
    eager, compiled = FusedPreResNet.from_members(plain), FusedPreResNet.from_members(plain)
    forward = torch.compile(compiled, dynamic=False)
    x = torch.randn(2, BATCH, 3, 8, 8)
    forward_tol, backward_tol = bounds(plain[0], x[0], bf16=False)
    a, b = eager(x), forward(x)
    a.square().mean().backward()
    b.square().mean().backward()
    assert rel(b, a) <= forward_tol
    assert rel(flat(p.grad for p in compiled.parameters()), flat(p.grad for p in eager.parameters())) <= backward_tol
    assert rel(flat(compiled.buffers()), flat(eager.buffers())) <= forward_tol
