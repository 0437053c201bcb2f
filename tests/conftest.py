"""Every test runs offline in its own folder: W&B offline, the artifact store and runs under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def offline_env(folder: Path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "KD_STORE": str(folder / "artifacts"),
            "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "HF_HUB_OFFLINE": "1",
            "TQDM_MININTERVAL": "5", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _no_token_of_a_torn_down_wandb_service():
    """wandb's own Agent ends with ``wandb.teardown()``, which stops this process's W&B service; a test's
    monkeypatch may then restore ``WANDB_SERVICE``, the token of that stopped service, and the next in-process W&B
    run would fail to connect to it. Without a service of this process, the token is dropped (wandb starts a new
    service, as in a fresh process)."""
    yield
    from wandb.sdk import wandb_setup

    if wandb_setup._singleton is None:
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is faster, and far faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """A numerical-equality test runs with one torch thread and with two: a result that depends on how a kernel
    splits its sums between threads shows up here, not on a user's machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def float_tol(dtype, terms: int, scale: float = 1.0, chained: int = 1) -> float:
    """How far apart two float computations of one value may be when they add their rounded products in another
    order (another kernel, batch split, fusion or thread count): the worst-case rounding bound of a chain of sums,
    ``terms * eps(dtype)`` where ``terms`` adds up the lengths of the sums along the computation's chain (e.g.
    a network's layers, forward and backward), times the magnitude of the values (``scale``), once per chained
    computation that feeds the next (``chained``, e.g. SGD steps). It depends on the dtype and the size of the
    computation only, never on one machine's kernels; a bug moves a value by orders of magnitude more, and in
    float64 the bound is tight (about 1e-11 for a few steps of a small network)."""
    import torch

    return chained * terms * torch.finfo(dtype).eps * scale


def assert_close_as(got, want, dtype, terms: int, chained: int = 1, msg: str = "") -> None:
    """``got`` equals ``want`` within :func:`float_tol` of ``dtype``, the scale being the larger of 1 and the
    largest magnitude in ``want``."""
    import torch

    want = torch.as_tensor(want)
    got = torch.as_tensor(got)
    scale = max(1.0, float(want.double().abs().max())) if want.numel() else 1.0
    tol = float_tol(dtype, terms, scale, chained)
    diff = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert diff <= tol, f"{msg}: max |difference| {diff:.3g} over the tolerance {tol:.3g} ({dtype}, {terms} terms, " \
                        f"{chained} chained)"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_script(script: str, *args: str, cwd: Path, check: bool = True, timeout: int = 300, env=None):
    """Run train.py / distill.py / a module as a user would, offline, in ``cwd``."""
    full = {**os.environ, **offline_env(cwd), **(env or {})}
    full.pop("WANDB_RUN_ID", None) if not (env and "WANDB_RUN_ID" in env) else None
    full.pop("WANDB_SERVICE", None)  # as `wandb agent` does: else every child shares this process's wandb-core,
    # which outlives a killed child and keeps its run id "in use" for the rerun
    cmd = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]), *args]
    out = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def run_main(script: str, *args: str, cwd: Path, env=None) -> int:
    """train.py / distill.py's (or ``-m kd.synthetic``'s) ``main`` in this process (no interpreter start, no imports:
    seconds saved), in
    ``cwd`` with the offline environment; for fixtures that only need what a run writes. Returns the exit code."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(script[3:] if script.startswith("-m ") else Path(script).stem)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the subprocesses
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**offline_env(cwd), **(env or {})}.items():
            mp.setenv(k, v)
        mp.delenv("WANDB_RUN_ID", raising=False)
        mp.chdir(cwd)
        try:
            module.main(list(args))
        except SystemExit as e:
            return int(e.code or 0)
        finally:
            torch.set_num_threads(threads)
    return 0


TINY = ["--dataset=digits", "--arch=preresnet8", "--batch_size=128"]


def merged(*argvs: list[str]) -> list[str]:
    """Flag lists joined, a later ``--key=value`` replacing an earlier one of the same key (the programs refuse a
    flag given twice); anything else (a bad argument a test means to pass) is kept as it is."""
    out: list[str] = []
    for argv in argvs:
        for arg in argv:
            key = arg.split("=", 1)[0] if arg.startswith("--") and "=" in arg else None
            if key is not None:
                out = [a for a in out if not a.startswith(key + "=")]
            out.append(arg)
    return out


def tiny(**settings) -> list[str]:
    """TINY with some of its settings replaced or added (a flag may be given once)."""
    base = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in TINY}
    return [f"--{k}={v}" for k, v in {**base, **settings}.items()]


@pytest.fixture(scope="session")
def teachers_dir(tmp_path_factory):
    """Three tiny digits teachers (seeds 0..2), trained once for the whole session (in-process)."""
    folder = tmp_path_factory.mktemp("teachers")
    for seed in range(3):  # W&B off here: these only need to be in the store (tests of W&B runs make their own)
        code = run_main("train.py", *TINY, "--epochs=2", f"--seed={seed}", cwd=folder, env={"WANDB_MODE": "disabled"})
        assert code == 0, f"teacher {seed} exited {code}"
    return folder


# ---------------------------------------------------------------------------------------------- shared helpers
def no_inception_download(monkeypatch, folder: Path) -> None:
    """As on a machine without network: the FID Inception's weights are not cached and cannot be downloaded
    (tests never reach for the network; ``generate`` tries FID by default)."""
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(folder / "torch-home"))
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def exit_code(entry, argv: list[str]) -> int:
    try:
        rc = entry(argv)
    except SystemExit as e:
        rc = e.code
    return rc


def refused(capsys, folder, entry, argv: list[str], needle: str) -> str:
    """``entry(argv)`` exits 2 with one line holding ``needle``, and ``folder`` is left exactly as it was."""
    capsys.readouterr()
    before = snapshot(folder)
    rc = exit_code(entry, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)
    assert snapshot(folder) == before, f"{argv} wrote {set(snapshot(folder)) ^ set(before)}"
    return lines[0]
