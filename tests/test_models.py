import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.models import Ensemble, build_model, count_params, ensemble_log_probs
from tests.conftest import assert_close_as, float_tol


def expected_preresnet_params(depth: int, classes: int) -> int:
    """Parameter count from the architecture in paper-facts.md, layer shape by layer shape."""
    bottleneck = depth >= 44
    n = (depth - 2) // (9 if bottleneck else 6)
    exp = 4 if bottleneck else 1
    total = 3 * 16 * 9  # stem conv, nothing after it
    inplanes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(n):
            s = stride if b == 0 else 1
            if bottleneck:
                total += 2 * inplanes + inplanes * planes  # bn1, 1x1
                total += 2 * planes + planes * planes * 9  # bn2, 3x3
                total += 2 * planes + planes * planes * 4  # bn3, 1x1 expand
            else:
                total += 2 * inplanes + inplanes * planes * 9 + 2 * planes + planes * planes * 9
            if s != 1 or inplanes != planes * exp:
                total += inplanes * planes * exp  # 1x1 projection on the raw input, no BN, no bias
            inplanes = planes * exp
    return total + 2 * inplanes + inplanes * classes + classes  # head BN + linear


@pytest.mark.parametrize("depth", [20, 56])
@pytest.mark.parametrize("classes", [10, 100])
def test_preresnet_parameter_count(depth, classes):
    assert count_params(build_model(f"preresnet{depth}", classes)) == expected_preresnet_params(depth, classes)


def test_preresnet56_uses_bottlenecks_and_raw_input_shortcut():
    m = build_model("preresnet56", 10)
    assert len(m.layer1) == 6 and m.layer1[0].conv3.out_channels == 64
    assert m.layer3[0].downsample.stride == (2, 2) and m.layer3[0].downsample.bias is None
    assert m.fc.in_features == 256


@pytest.mark.parametrize("size", [8, 32])
def test_forward_shapes(size):
    for arch in ("preresnet8", "preresnet20"):
        out = build_model(arch, 7)(torch.randn(2, 3, size, size))
        assert out.shape == (2, 7)


def test_timm_bridge_builds_untrained_model_with_class_count():
    m = build_model("timm:resnet18", 13)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 13)


@pytest.mark.parametrize("arch", ["preresnet21", "resnet56", "timm:not_a_model", "preresnet4"])
def test_bad_arch_is_refused(arch):
    with pytest.raises(KDError):
        build_model(arch, 10)


def test_ensemble_log_probs_matches_direct_computation():
    logits = torch.randn(5, 4, 10) * 30  # large logits: a naive exp would overflow in float16
    direct = torch.log(F.softmax(logits.double(), -1).mean(0))
    tol = float_tol(torch.float32, 5 * 10, scale=float(logits.abs().max()))  # sums of 5 members x 10 classes
    assert torch.allclose(ensemble_log_probs(logits).double(), direct, atol=tol, rtol=0)
    assert torch.isfinite(ensemble_log_probs(logits * 100)).all()
    assert torch.allclose(ensemble_log_probs(logits).exp().sum(-1), torch.ones(4), atol=tol, rtol=0)
    single = torch.randn(1, 3, 10)
    assert torch.allclose(ensemble_log_probs(single), F.log_softmax(single[0], -1), rtol=0,
                          atol=float_tol(torch.float32, 10, scale=float(single.abs().max())))


def test_fused_ensemble_equals_plain_loop(threads):
    torch.manual_seed(0)
    members = [build_model("preresnet8", 10) for _ in range(3)]
    for m in members:  # give each member its own BN statistics
        m.train()
        m(torch.randn(32, 3, 8, 8) * (1 + len(members)))
    x = torch.randn(6, 3, 8, 8)
    stacked, loop = Ensemble(members, stacked=True), Ensemble(members, stacked=False)
    terms = 8 * 64 * 9  # 8 layers, each summing at most 64 channels x 3 x 3
    assert_close_as(stacked.member_logits(x), loop.member_logits(x), torch.float32, terms, msg="member logits")
    assert_close_as(stacked(x), loop(x), torch.float32, terms, msg="ensemble")
    manual = torch.log(torch.stack([F.softmax(m.eval()(x), -1) for m in members]).mean(0))
    assert_close_as(loop(x), manual, torch.float32, 3 * 10, msg="log of the mean probability")
    assert stacked.fusable() and stacked._fused is not None and not stacked._fused[1].training  # one network
    mixed = [members[0], build_model("preresnet14", 10).eval()]  # two depths: looped even when asked to fuse
    assert not Ensemble(mixed, stacked=True).fusable()
    assert torch.equal(Ensemble(mixed, stacked=True).member_logits(x), Ensemble(mixed, stacked=False).member_logits(x))
    later = copy.deepcopy(members[0])
    later.bn.num_batches_tracked += 1  # trained one step longer: its count cannot share a fused BatchNorm's
    assert not Ensemble([members[1], later], stacked=True).fusable()
    stacked.train()
    assert not any(m.training for m in stacked.members)
    assert math.isclose(sum(p.requires_grad for p in stacked.parameters()), 0)
