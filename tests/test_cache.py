"""The teacher-output cache is exact: it holds what the teachers output on every view, it is reused only for
the same teachers, a damaged file is refused, and a student trained from it follows the same trajectory as
one whose teachers run every step.

Tolerances: float32 caches match the teachers' own outputs within float32's rounding bound for a PreResNet-8's
chain of sums (:func:`tests.conftest.float_tol`; only the batch size of the convolutions differs); float16
storage adds half a float16 unit of the largest log-probability (magnitude < 16, 11-bit mantissa).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from kd import teacher_cache as kt
from kd.config import DistillConfig
from kd.data import Data, apply_views, load_dataset, num_views
from kd.datasets import DATASETS
from kd.errors import KDError
from kd.models import Ensemble, build_model
from kd.objectives import Distill
from kd.teacher_cache import all_view_targets, cache_key, cached_targets
from tests.conftest import assert_close_as, float_tol

TERMS = 8 * 64 * 9  # 8 layers, each summing at most 64 channels x 3 x 3 (the forward pass of a PreResNet-8)
ATOL = float_tol(torch.float32, TERMS, scale=16.0)  # log-probabilities of magnitude < 16
HALF = torch.finfo(torch.float16).eps / 2 * 16.0 + ATOL  # float16 storage of those


pytestmark = pytest.mark.usefixtures("one_thread")


def make_teachers(m: int, classes: int, seed: int = 0) -> list[torch.nn.Module]:
    """Random preresnet8 teachers in eval mode whose BN statistics are not the identity (so eval != train)."""
    torch.manual_seed(seed)
    out = []
    for _ in range(m):
        net = build_model("preresnet8", classes)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
        out.append(net.eval())
    return out


def cifar_like(n: int = 3, classes: int = 100) -> Data:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Data(DATASETS["cifar100"], x, y, x[:2].clone(), y[:2].clone())


@functools.cache
def digits() -> Data:
    return load_dataset("digits")


def digits_subset(n: int = 5) -> Data:
    d = digits()
    return Data(d.spec, d.train_x[:n], d.train_y[:n], d.test_x[:4], d.test_y[:4])


@torch.no_grad()
def direct(members, image: torch.Tensor, spec) -> torch.Tensor:
    """The paper's way, one image at a time: every view through every member, log(mean(softmax))."""
    v = torch.arange(num_views(spec))
    x = apply_views(image[None].expand(len(v), -1, -1, -1), v, spec)
    probs = torch.stack([F.softmax(m(x), -1) for m in members]).mean(0)
    return probs.log()


@pytest.mark.parametrize("which,views", [("digits", 9), ("cifar", 162)])
@pytest.mark.parametrize("m", [1, 3])
def test_cache_equals_teachers_on_every_view(which, views, m):
    data = digits_subset() if which == "digits" else cifar_like()
    members = make_teachers(m, data.spec.num_classes, seed=m)
    cache = all_view_targets(Ensemble(members), data, batch_size=100, progress=False)  # chunks cross images
    assert cache.shape == (data.n_train, views, data.spec.num_classes) and cache.dtype == torch.float32
    for i in range(data.n_train):
        want = direct(members, data.train_x[i], data.spec)
        torch.testing.assert_close(cache[i], want, atol=ATOL, rtol=0)
    spread = (cache - cache[:, :1]).abs().amax().item()
    assert spread > 1e-3, "views must give different outputs, else this test proves nothing"
    half = all_view_targets(Ensemble(members), data, dtype=torch.float16, progress=False)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), cache, atol=HALF, rtol=0)


def test_cache_file_reused_for_same_teachers_new_for_others(tmp_path, monkeypatch):
    """One file per teacher (and dtype): reused for the same teacher, a new one for another teacher."""
    data = digits_subset(8)
    ens = Ensemble(make_teachers(1, 10))
    first, path, built = cached_targets(ens, data, ["a"], tmp_path, torch.float32)
    assert built and path.exists() and path.with_suffix(".json").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the teachers ran although the cache exists")

    monkeypatch.setattr(kt, "all_view_targets", must_not_run)
    again, path2, built2 = cached_targets(ens, data, ["a"], tmp_path, torch.float32)
    assert not built2 and path2 == path and torch.equal(again, first)
    monkeypatch.undo()
    assert cache_key(["a", "c"], data) != cache_key(["a", "b"], data)
    assert cache_key(["b", "a"], data) != cache_key(["a", "b"], data)  # member order is part of the key
    other, path3, built3 = cached_targets(ens, data, ["c"], tmp_path, torch.float32)
    assert built3 and path3 != path
    half, path4, built4 = cached_targets(ens, data, ["a"], tmp_path, torch.float16)
    assert built4 and path4 not in (path, path3) and half.dtype == torch.float16
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    _, _, built5 = cached_targets(ens, data, ["a"], tmp_path, torch.float32)  # float32 file untouched
    assert not built5


def test_corrupt_cache_refused_missing_cache_rebuilt(tmp_path):
    data = digits_subset(4)
    ens = Ensemble(make_teachers(1, 10))
    good, path, _ = cached_targets(ens, data, ["t"], tmp_path, torch.float32)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(KDError, match="corrupt or was changed.*--teacher_cache=False"):
        cached_targets(ens, data, ["t"], tmp_path, torch.float32)
    assert path.read_bytes() == bytes(raw)  # refused, not overwritten behind the user's back
    path.unlink()
    rebuilt, _, built = cached_targets(ens, data, ["t"], tmp_path, torch.float32)
    assert built and torch.equal(rebuilt, good)


def test_cache_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    data = digits_subset(4)
    monkeypatch.setattr(kt, "free_bytes", lambda device: 1000)
    with pytest.raises(KDError, match="--teacher_cache=False"):
        cached_targets(Ensemble(make_teachers(1, 10)), data, ["t"], tmp_path, torch.float32)
    assert not list(tmp_path.iterdir())
    assert kt.cache_bytes(Data(DATASETS["cifar100"], torch.empty(50000, 0), torch.empty(0), torch.empty(0),
                               torch.empty(0)), 100, torch.float32) == 50000 * 162 * 100 * 4


def sgd_steps(objective: Distill, student: torch.nn.Module, steps: int):
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    losses, targets = [], []
    for s, batch in enumerate(objective.batches(epoch=0)):
        if s == steps:
            break
        loss, _ = objective.loss(student(batch["x"]), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        targets.append(batch["target"])
    return losses, targets


def test_student_same_trajectory_with_and_without_cache():
    data = digits_subset(600)
    ens = Ensemble(make_teachers(3, 10, seed=5))
    g = torch.Generator().manual_seed(3)
    synthetic = torch.randint(0, 256, (150, 3, 8, 8), dtype=torch.uint8, generator=g)
    cache = all_view_targets(ens, data, progress=False)
    torch.manual_seed(11)
    student = build_model("preresnet8", 10)
    runs = {}
    for name, c in (("cache", cache), ("teachers", None)):
        obj = Distill(DistillConfig(batch_size=128, temperature=4.0, seed=2), data, ens, synthetic, cache=c)
        assert obj.syn_b > 0  # mixed real + synthetic batches
        net = copy.deepcopy(student).train()
        runs[name] = (*sgd_steps(obj, net, steps=4), net)
    (l_c, t_c, net_c), (l_t, t_t, net_t) = runs["cache"], runs["teachers"]
    for a, b in zip(t_c, t_t):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    terms = 8 * 128 * 8 * 8  # the student's 8 layers, a gradient summing over 128 images x 8 x 8 positions
    for s, (a, b) in enumerate(zip(l_c, l_t)):
        assert_close_as(a, b, torch.float32, terms, chained=s + 1, msg=f"loss of step {s}")
    assert l_c[0] != l_c[-1]  # the student did move
    for (k, a), b in zip(net_c.state_dict().items(), net_t.state_dict().values()):
        assert_close_as(a.float(), b.float(), torch.float32, terms, chained=len(l_c), msg=k)


@pytest.mark.parametrize("which", ["digits", "cifar"])
def test_member_caches_combined_equal_the_stacked_ensemble_and_are_shared(which, tmp_path, monkeypatch):
    """Per-member files combined on the fly give the stacked ensemble's targets on every view, and a second
    ensemble that shares a member reads that member's file instead of running it again."""
    data = digits_subset() if which == "digits" else cifar_like(n=2)
    c = data.spec.num_classes
    members = make_teachers(4, c, seed=7)
    abc, (a, _, cc, d) = Ensemble(members[:3], stacked=True), members
    want = all_view_targets(abc, data, progress=False)  # the old design: one stacked pass of the ensemble
    got, path, built = cached_targets(abc, data, ["ha", "hb", "hc"], tmp_path, torch.float32)
    assert built and path == kt.member_path(tmp_path, "ha", data, torch.float32) and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for i in range(data.n_train):  # and the paper's way, view by view
        torch.testing.assert_close(got[i], direct(members[:3], data.train_x[i], data.spec), atol=ATOL, rtol=0)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # one file per member

    ran = []
    real = kt.all_view_targets
    monkeypatch.setattr(kt, "all_view_targets", lambda ens, *args, **kw: ran.append(list(ens.members)) or
                        real(ens, *args, **kw))
    second = Ensemble([cc, d])  # shares member c with the first ensemble
    got2, path2, built2 = cached_targets(second, data, ["hc", "hd"], tmp_path, torch.float32)
    assert built2 and path2 == kt.member_path(tmp_path, "hc", data, torch.float32)
    assert len(ran) == 1 and ran[0][0] is d, "only the new member d may run: c's file is reused"
    torch.testing.assert_close(got2, all_view_targets(Ensemble([cc, d]), data, progress=False), atol=ATOL, rtol=0)
    ran.clear()
    again, _, built3 = cached_targets(Ensemble([d, a]), data, ["hd", "ha"], tmp_path, torch.float32)
    assert not built3 and not ran  # every member on file: nothing computed
    torch.testing.assert_close(again, all_view_targets(Ensemble([d, a]), data, progress=False), atol=ATOL, rtol=0)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4

    half, _, _ = cached_targets(abc, data, ["ha", "hb", "hc"], tmp_path, torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), want, atol=HALF, rtol=0)


def test_combine_in_chunks_is_logaddexp():
    g = torch.Generator().manual_seed(0)
    acc, other = torch.randn(5, 7, 3, generator=g), torch.randn(5, 7, 3, generator=g).half()
    want = torch.logaddexp(acc, other.float())
    tol = float_tol(torch.float32, 2, scale=4.0)  # log(exp(a) + exp(b)) of magnitudes < 4
    torch.testing.assert_close(kt.combine(acc.clone(), other, rows=4), want, atol=tol, rtol=0)


def test_damaged_member_file_is_refused_for_every_ensemble_that_holds_it(tmp_path):
    data = digits_subset(4)
    members = make_teachers(2, 10)
    cached_targets(Ensemble(members), data, ["t0", "t1"], tmp_path, torch.float32)
    path = kt.member_path(tmp_path, "t1", data, torch.float32)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    for ens, hashes in ((Ensemble(members), ["t0", "t1"]), (Ensemble(members[1:]), ["t1"])):
        with pytest.raises(KDError, match=rf"{path.name} is corrupt or was changed.*--teacher_cache=False"):
            cached_targets(ens, data, hashes, tmp_path, torch.float32)
    assert path.read_bytes() == bytes(raw)
