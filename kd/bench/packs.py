"""Packs of k students: one :class:`kd.fused.FusedPreResNet` step of k members against k plain steps, a row per
convolution shape (one grouped convolution against k separate ones), and k processes sharing one GPU.

Both sides run the device's eager precision (:func:`kd.bench.steps.plain_precision`) on the study's student
batch per member. The processes-per-GPU figure is a projection (named in its record): k processes time-slice
one GPU, so together they run at most k times one process's rate and at most until the GPU is busy, i.e.
``min(k, 1 / busy fraction)`` times the rate of one; memory, context switches and interference are left out.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.bench.steps import channels_last, loss_of, model_step, plain_precision, sgd, targets


def fused_step(ctx, k: int):
    from kd.fused import FusedPreResNet

    w, v = ctx.workload, plain_precision(ctx.device)
    torch.manual_seed(0)
    model = FusedPreResNet(w.depth, w.classes, k, device=ctx.device).to(memory_format=torch.channels_last).train()
    opt = sgd(model.parameters())
    x = torch.randn(k, w.batch, 3, 32, 32, device=ctx.device)
    target, loss_fn = targets("student", (k * w.batch,), w.classes, ctx.device), loss_of("student", w.temperature)

    def step() -> None:
        with v.autocast(ctx.device):
            logits = model(x)
        (k * loss_fn(logits.flatten(0, 1), target)).backward()  # the members' losses summed
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def plain_steps(ctx, k: int):
    w, v = ctx.workload, plain_precision(ctx.device)
    steps = [model_step(w.arch, w.classes, w.batch, ctx.device, v, "student", w.temperature)[0] for _ in range(k)]

    def step() -> None:
        for s in steps:
            s()

    return step


def conv_shapes(arch: str, classes: int) -> list[dict]:
    """Every distinct convolution of ``arch`` on a 32 px input: its shape, input size and count."""
    from kd.models import build_model

    model, seen = build_model(arch, classes), {}

    def hook(mod, inp, _out) -> None:
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], inp[0].shape[-1])
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return [{"cin": c, "cout": o, "kernel": kk, "stride": s, "size": hw, "count": n}
            for (c, o, kk, s, hw), n in seen.items()]


def conv_row(ctx, shape: dict, k: int) -> dict:
    """Forward and backward of one grouped convolution (groups=k) against k separate convolutions."""
    dev, v, b = ctx.device, plain_precision(ctx.device), ctx.workload.batch
    pad, cin, cout = shape["kernel"] // 2, shape["cin"], shape["cout"]
    grouped = nn.Conv2d(k * cin, k * cout, shape["kernel"], shape["stride"], pad, groups=k, bias=False).to(dev)
    grouped = grouped.to(memory_format=torch.channels_last)
    singles = [nn.Conv2d(cin, cout, shape["kernel"], shape["stride"], pad, bias=False).to(dev).to(
        memory_format=torch.channels_last) for _ in range(k)]
    xg = channels_last(torch.randn(b, k * cin, shape["size"], shape["size"], device=dev))
    xs = [channels_last(torch.randn(b, cin, shape["size"], shape["size"], device=dev)) for _ in range(k)]

    def run_grouped() -> None:
        with v.autocast(dev):
            grouped(xg).float().sum().backward()

    def run_singles() -> None:
        with v.autocast(dev):
            for conv, x in zip(singles, xs):
                conv(x).float().sum().backward()

    g, s = ctx.timer.per_step(run_grouped)["s"], ctx.timer.per_step(run_singles)["s"]
    return {**shape, "k": k, "grouped_s": g, "separate_s": s, "speedup": s / g}


def section_packs(ctx) -> dict:
    w = ctx.workload
    out = {"arch": w.arch, "batch_per_member": w.batch, "precision": plain_precision(ctx.device).name, "k": {},
           "left_out": {}}
    for k in w.packs:
        need = 8.0 * ctx.scale * k
        if not ctx.clock.fits(need):
            out["left_out"][f"k={k}"] = f"over budget: {ctx.clock.left():.0f} s left, needs about {need:.0f} s"
            continue
        fused = ctx.timer.per_step(fused_step(ctx, k))["s"]
        plain = ctx.timer.per_step(plain_steps(ctx, k))["s"]
        out["k"][str(k)] = {"fused_s_per_step": fused, "plain_s_per_k_steps": plain, "speedup": plain / fused,
                            "fused_s_per_student_step": fused / k}
        ctx.partial("packs", out)
        ctx.say(f"pack k={k}: fused {fused * 1e3:.1f} ms vs {k} plain {plain * 1e3:.1f} ms ({plain / fused:.2f}x)")
    k = max(w.packs)
    out["conv_rows"] = []
    for shape in conv_shapes(w.arch, w.classes):
        if not ctx.clock.fits(2.0 * ctx.scale):
            out["left_out"]["conv_rows"] = f"over budget after {len(out['conv_rows'])} shapes"
            break
        out["conv_rows"].append(conv_row(ctx, shape, k))
        ctx.partial("packs", out)
    return out


def section_processes(ctx, student: dict | None) -> dict:
    """k processes per GPU, projected from one process's measured GPU-busy fraction (the assumption named)."""
    best = (student or {}).get("best")
    measured = (student or {}).get("variants", {}).get(best or "", {})
    busy = measured.get("gpu_busy_fraction")
    out = {"measured": False, "configuration": f"student step, {best}" if best else None,
           "assumption": "k processes time-slice one GPU: together at most k times one process's rate and at most "
                         "until the GPU is busy (min(k, 1 / GPU-busy fraction)); memory, context switches and "
                         "interference left out", "k": {}}
    if busy is None:
        out["reason"] = ("no GPU-busy fraction: it is measured on CUDA only" if ctx.device.type != "cuda"
                         else "the student step was not measured")
        return out
    rate = measured["img_per_s"]
    for k in (1, 2, 4, 8):
        gain = min(k, 1 / busy) if busy > 0 else k
        out["k"][str(k)] = {"speedup": gain, "img_per_s": rate * gain}
    return out
