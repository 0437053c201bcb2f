"""The Accelerator of a run (:func:`accelerator`), and compiled training steps that compile once: ``torch.compile``
with static shapes for the engine's loop.

:func:`compile_model` is what :class:`kd.session.Session` calls for ``--compile=True`` (and returns the model
itself otherwise). The callable it returns:

* compiles the model with ``dynamic=False`` for one batch shape, the largest seen so far: every full batch of
  every epoch reuses that one graph (forward and backward), so nothing is recompiled after the first step;
* runs every *smaller* batch (the short last batch of an epoch, a rank's smaller part) eagerly, through the
  very same module and parameters: a handful of steps per run at eager speed instead of a recompilation (or
  dynamic-shape graphs, whose compilation is what stalled the first ``--compile=True`` runs), and the
  numbers are the same up to float rounding (tests/test_accel.py);
* runs eval mode (evaluation, teacher predictions) eagerly too: the graph is traced in train mode only;
* never blocks on anything but the compilation itself: a SIGTERM that arrives while the first step compiles
  is recorded by :func:`kd.errors.stop_requests` and honoured when that step ends (the loop checks after
  every step). A larger batch than any before (a resumed run with a
  larger batch, say) compiles once more, since a batch shape is part of the graph.

``mode`` is torch.compile's: None (inductor's default), ``"reduce-overhead"`` (CUDA graphs: fewer kernel
launches, the lever for small networks on GPUs), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``;
``python -m kd.bench`` times them. train.py and distill.py compile with ``--compile_mode`` (auto: reduce-overhead
on CUDA, where ``--compile`` is on by default; :func:`kd.config.resolve_device_defaults`).
"""

from __future__ import annotations

import os

import torch

MODES = (None, "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def accelerator(mixed_precision: str, cpu: bool):
    """The run's Accelerator. On a machine without CUDA it is told so (``cpu=True``): under a distributed launcher
    (``accelerate launch`` / torch's elastic launcher, ``LOCAL_RANK`` set) Accelerate then joins the processes
    with gloo, where it would otherwise run each process as a world of its own."""
    from accelerate import Accelerator

    if os.environ.get("TORCHELASTIC_RUN_ID"):
        _stop_with_parent()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu or not torch.cuda.is_available())


def _stop_with_parent() -> None:
    """A worker of torch's elastic launcher sits in a session of its own: were the launcher killed, it would run
    on with nobody waiting for it. On Linux it gets SIGTERM when its parent dies (it checkpoints and exits)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


class StaticCompiled:
    """``model(x)`` through one static-shape compiled graph for the largest batch shape, eager otherwise."""

    def __init__(self, model: torch.nn.Module, mode: str | None = None):
        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r}: expected one of {MODES}")
        self.model, self.mode = model, mode
        self.compiled = torch.compile(model, dynamic=False, mode=mode)
        self.shape: tuple | None = None  # the one shape the graph is compiled for
        self.compiled_calls = 0
        self.eager_calls = 0
        self.shapes_compiled = 0  # how many shapes were compiled (1 in a run of one batch size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training and self._takes(x):
            self.compiled_calls += 1
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's outputs may be reused
            return self.compiled(x)
        self.eager_calls += 1
        return self.model(x)

    def _takes(self, x: torch.Tensor) -> bool:
        shape = tuple(x.shape)
        if self.shape is not None and shape == self.shape:
            return True
        if self.shape is None or shape[0] > self.shape[0]:
            self.shape = shape
            self.shapes_compiled += 1
            return True
        return False

    def __getattr__(self, name):  # the wrapped module's attributes (train(), parameters(), ...)
        return getattr(self.__dict__["model"], name)


def compile_model(model: torch.nn.Module, cfg, mode: str | None = None):
    """The engine's forward: ``model`` itself unless ``cfg.compile``, else a :class:`StaticCompiled` (mode:
    ``mode``, else ``cfg.compile_mode``; "default" is torch.compile's own)."""
    if str(getattr(cfg, "compile", False)) != "True":
        return model
    mode = mode or getattr(cfg, "compile_mode", "default")
    return StaticCompiled(model, mode=None if mode == "default" else mode)
