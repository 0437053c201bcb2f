"""The three ways to train that the benchmark compares: the engine, a bare step, and the paper's loop."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.bench.common import CLASSES, TEMPERATURE, Sizes, amp, sync


def engine_cfg(sizes: Sizes, device, job: str, batch: int, root: Path, compile: bool, epochs: int = 0):
    from kd.config import DistillConfig, TrainConfig

    cls = TrainConfig if job == "teacher" else DistillConfig
    epochs = epochs or sizes.epochs
    cfg = cls(dataset="cifar100", arch=sizes.arch, epochs=epochs, batch_size=batch, eval_every=epochs,
              out_dir=str(root), resume="False", cpu=device.type == "cpu", channels_last=True, compile=compile,
              mixed_precision="bf16" if device.type == "cuda" else "no")
    cfg.validate()
    return cfg


class Engine:
    """Session.fit as train.py / distill.py run it; one fresh Session (and student) per round."""

    def __init__(self, sizes: Sizes, device: torch.device, job: str, batch: int, make_objective, root: Path,
                 compile: bool, epochs: int = 0):
        self.cfg = engine_cfg(sizes, device, job, batch, root, compile, epochs)
        self.job, self.make_objective = job, make_objective
        self.history: list[dict] = []

    def round(self) -> float:
        """Images/s: the median of the epochs after the first (the first warms up, or compiles)."""
        from kd.models import build_model, to_device
        from kd.optim import optimizer
        from kd.session import Session

        session = Session(self.cfg, job=self.job)
        objective = self.make_objective(session)
        torch.manual_seed(0)
        model = to_device(build_model(self.cfg.arch, CLASSES), session.device)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.history = session.fit(model, optimizer(model.parameters(), self.cfg), objective)
        return statistics.median(row["throughput/img_per_s"] for row in self.history[1:])


class Bare:
    """Forward/backward/step of the engine's model on batches made beforehand: no loop, no objective."""

    def __init__(self, arch: str, batches: list, device: torch.device, compile: bool):
        from kd.accel import StaticCompiled
        from kd.models import build_model

        torch.manual_seed(0)
        self.model = build_model(arch, CLASSES).to(device).to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.fwd = StaticCompiled(self.model) if compile else self.model
        self.batches = [(b["x"].contiguous(memory_format=torch.channels_last), b["y"]) for b in batches]
        self.device = device
        self.i = 0
        self.round(2)  # warm-up

    def round(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            with amp(self.device):
                loss = F.cross_entropy(self.fwd(x).float(), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            n += x.shape[0]
        sync(self.device)
        return n / (time.perf_counter() - t0)


class PILCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR100's __getitem__: HWC uint8 array -> PIL image -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).cpu().numpy()
        self.targets = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


class Paper:
    """The paper's loop: DataLoader over PIL transforms, fp32 NCHW, teachers member by member."""

    def __init__(self, arch: str, data, batch: int, device: torch.device, members: list | None = None):
        import torchvision.transforms as T

        from kd.models import build_model

        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.loader = torch.utils.data.DataLoader(
            PILCifar(data.train_x, data.train_y, tf), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        torch.manual_seed(0)
        self.student = build_model(arch, CLASSES).to(device).train()
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.teachers = [copy.deepcopy(m).eval() for m in members or []]
        self.device = device
        self.batches = self._forever()
        self.running_loss = 0.0
        self.round(2)  # warm-up (and the workers' start)

    def _forever(self):
        while True:
            yield from self.loader

    def round(self, steps: int) -> float:
        from kd.losses import kd_loss

        sync(self.device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.teachers:
                with torch.no_grad():
                    probs = torch.stack([F.softmax(t(x), dim=-1) for t in self.teachers]).mean(0)
                loss = kd_loss(self.student(x), probs.log(), TEMPERATURE)
            else:
                loss = F.cross_entropy(self.student(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.running_loss += loss.item()
            n += x.shape[0]
        sync(self.device)
        return n / (time.perf_counter() - t0)
