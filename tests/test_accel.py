"""kd.accel: a compiled training step computes what the eager step computes, and compiles once.

Tolerances: inductor fuses and reorders float32 arithmetic, so losses, gradients and weights agree within the
rounding bound of float32 for the network's chain of sums (:func:`tests.conftest.float_tol`), once per SGD step
taken, far below any difference a bug would make.
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kd.accel import StaticCompiled, compile_model
from kd.models import build_model
from tests.conftest import assert_close_as

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (n,), generator=g)))
    return out


def steps(model, fwd, data):
    """SGD steps as the engine takes them; returns the losses and every step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    losses, grads = [], []
    for x, y in data:
        loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


@pytest.mark.slow  # torch.compile: half a minute of inductor on the CPU (make chaos runs it)
def test_compiled_steps_equal_eager_steps_and_compile_once():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = build_model("preresnet8", 10).to(memory_format=torch.channels_last).train()
    model = copy.deepcopy(eager)
    fwd = compile_model(model, SimpleNamespace(compile=True))
    assert isinstance(fwd, StaticCompiled)
    data = batches([16, 16, 5, 16])  # two full batches, an epoch's short last batch, a full one again
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    try:
        got = steps(model, fwd, data)
    except Exception as e:  # say why, never skip
        raise AssertionError(f"torch.compile cannot run on this machine ({type(e).__name__}: {e}); inductor "
                             "needs a working C++ compiler (gcc) on the CPU") from e
    took = time.perf_counter() - t0
    want = steps(eager, eager, data)
    terms = 8 * 16 * 8 * 8  # 8 layers, each summing over at most 16 images x 8 x 8 positions
    for s, (a, b) in enumerate(zip(got[0], want[0])):
        assert_close_as(a, b, torch.float32, terms, chained=s + 1, msg=f"loss of step {s}")
    for s, (ga, gb) in enumerate(zip(got[1], want[1])):
        for k in gb:
            assert_close_as(ga[k], gb[k], torch.float32, terms, chained=s + 1, msg=f"step {s} grad {k}")
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):  # BN statistics included
        assert_close_as(a.float(), b.float(), torch.float32, terms, chained=len(data), msg=k)
    assert fwd.shapes_compiled == 1 and fwd.compiled_calls == 3 and fwd.eager_calls == 1
    assert counters["stats"]["unique_graphs"] - graphs == 1, "one graph: the short batch must not recompile"
    assert took < 240, f"compiling preresnet8 took {took:.0f} s"

    model.eval()  # evaluation runs eagerly, never traced in eval mode
    x = data[0][0]
    torch.testing.assert_close(fwd(x), model(x))
    assert fwd.eager_calls == 2 and counters["stats"]["unique_graphs"] - graphs == 1


def test_compile_off_returns_the_model_and_modes_are_checked():
    model = build_model("preresnet8", 10)
    assert compile_model(model, SimpleNamespace(compile=False)) is model
    with pytest.raises(ValueError, match="compile mode"):
        StaticCompiled(model, mode="fast")


@pytest.mark.slow  # a long end-to-end test: make chaos runs it
def test_larger_batch_takes_the_graph_smaller_ones_run_eagerly():
    calls = []
    fwd = StaticCompiled(torch.nn.Identity())
    fwd.compiled = lambda x: calls.append(("compiled", x.shape[0])) or x
    fwd.model = type("M", (), {"training": True, "__call__": lambda self, x: calls.append(("eager", x.shape[0]))
                              or x})()
    for n in (8, 3, 8, 12, 8, 12):
        fwd(torch.zeros(n, 2))
    assert calls == [("compiled", 8), ("eager", 3), ("compiled", 8), ("compiled", 12), ("eager", 8),
                     ("compiled", 12)]
    assert fwd.shapes_compiled == 2
