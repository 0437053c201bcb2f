"""W&B runs: which mode, which run id, what a resumed run already holds, and the reader of offline runs.

* :func:`wandb_mode`: ``WANDB_MODE`` if set, else online when a W&B login exists, else offline.
* :func:`new_run_id`: W&B's own run id format (a run folder records its id: :mod:`kd.run_folder`).
* :func:`last_logged_step`: the highest step a resumed run already holds (W&B drops a step that goes back).
* Offline runs on disk are read with W&B's own reader, ``wandb leet inspect`` (:func:`inspect_summary`,
  :func:`inspect_history`); folders that share a run id are the parts of one resumed run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kd.errors import KDError

MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        if mode not in MODES:
            raise KDError(f"WANDB_MODE={mode!r} is not a W&B mode: set it to online, offline or disabled "
                          "(or unset it: online when logged in, else offline)")
        return MODES[mode]
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    """A W&B login, found where wandb itself looks (wbauth's system auth): WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE; else the netrc entry of the configured host, port included (WANDB_BASE_URL, the
    host saved by `wandb login --host` in W&B's settings file); else an api_key in those settings."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if settings.api_key:
        return True
    try:
        return bool(wbauth.read_netrc_auth(host=settings.base_url))
    except AuthenticationError as e:
        raise KDError(f"the W&B login for {settings.base_url} in your netrc is malformed ({e}): run "
                      "`wandb login --relogin`, or set WANDB_MODE=offline") from None


REACH_TIMEOUT_S = 10.0
_REACHED: set = set()  # (host, port) this process has connected to


def check_reachable(timeout: float = REACH_TIMEOUT_S) -> None:
    """Online: W&B's server (or the HTTPS proxy in the way) accepts a connection within ``timeout`` seconds, else a
    one-line error at once (``wandb.init`` and the API would retry for minutes before saying so)."""
    import socket
    from urllib.parse import urlsplit

    from wandb.sdk import wandb_setup

    base = os.environ.get("WANDB_BASE_URL") or wandb_setup.singleton().settings.base_url
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy if proxy else base)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if (host, port) in _REACHED:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            _REACHED.add((host, port))
            return
    except OSError as e:
        via = f" through the proxy {host}:{port}" if proxy else ""
        why = e.strerror or type(e).__name__
        raise KDError(f"W&B at {base} is not reachable{via} ({why}): check the network, or run offline with "
                      "WANDB_MODE=offline (upload the runs later with `wandb sync`)") from None


def announce_mode(mode: str) -> str:
    if mode == "online":
        return "W&B: online (logged in); runs and artifacts go to your W&B project"
    if mode == "disabled":
        return "W&B: disabled (WANDB_MODE=disabled); nothing is tracked, the local store still is"
    return ("W&B: offline (no login found); runs are written under ./wandb (upload later with `wandb sync`), "
            "artifacts mirrored in the local store")


def wandb_dir() -> str | None:
    """$WANDB_DIR as it is now (wandb reads it once per process, at its first run)."""
    return os.environ.get("WANDB_DIR") or None


RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # letters, digits, . _ - (W&B refuses :;,#?/')


def exported_run_id() -> str | None:
    """$WANDB_RUN_ID (as a sweep agent sets it), checked before anything records it; None when unset."""
    raw = os.environ.get("WANDB_RUN_ID")
    if raw is None or raw == "":
        return None
    if not RUN_ID_RE.match(raw) or ".." in raw:
        shown = raw.encode("utf-8", "backslashreplace").decode()[:60]
        raise KDError(f"WANDB_RUN_ID={shown!r} is not a W&B run id (letters, digits, '.', '_' and '-', at most 128): "
                      "unset it for a new id")
    return raw


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def last_logged_step(run, mode: str) -> int:
    """The highest W&B step this (resumed) run already holds, 0 if none: a rerun logs only the steps after it."""
    if run is None or mode == "disabled":
        return 0
    if mode == "online":
        return max(int(getattr(run, "step", 0)) - 1, 0) if run.resumed else 0
    here = Path(run.dir).parent
    best = 0
    for folder in sorted(here.parent.glob(f"offline-run-*-{run.id}")):
        if folder.resolve() != here.resolve():
            best = max([best, *(row["_step"] for row in inspect_history(folder))])
    return best


# ------------------------------------------------------------------------------------------------ reader
def clean(d: dict | None) -> dict:
    """A W&B config or summary without W&B's own ``_`` keys."""
    return {k: v for k, v in (d or {}).items() if not str(k).startswith("_")}


def wandb_exe() -> str:
    """The `wandb` CLI of this interpreter's environment (beside sys.executable), else the one on PATH."""
    exe = Path(sys.executable).with_name("wandb")
    if exe.exists():
        return str(exe)
    found = shutil.which("wandb")
    if not found:
        raise KDError(f"the `wandb` command is not installed beside {sys.executable}: pip install wandb")
    return found


def offline_folders(root: str | Path) -> list[Path]:
    """``offline-run-*`` folders under ``DIR/wandb`` (or ``DIR`` itself when it is the wandb folder)."""
    root = Path(root)
    base = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(p for p in base.glob("offline-run-*") if p.is_dir())


def transaction_log(folder: Path) -> Path:
    logs = sorted(folder.glob("run-*.wandb"))
    if len(logs) != 1:
        raise KDError(f"cannot read W&B run folder {folder}: expected one run-*.wandb transaction log, "
                      f"found {len(logs)}; remove the folder if it is debris")
    return logs[0]


def leet_inspect(folder: Path, summary: bool) -> str:
    cmd = [wandb_exe(), "leet", "inspect", "--json", *(["--summary"] if summary else []),
           str(transaction_log(folder))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    except subprocess.TimeoutExpired:
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect` took over 600 s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect` failed: {why[:300]}")
    return proc.stdout


def leet_records(folder: Path) -> list[dict]:
    """Every record of an offline run's transaction log, through W&B's own reader."""
    return [json.loads(line) for line in leet_inspect(folder, summary=False).splitlines() if line.strip()]


def inspect_summary(folder: Path) -> dict:
    """``wandb leet inspect --summary --json``: one object with run_id, name, start_time, config, summary."""
    out = leet_inspect(folder, summary=True)
    try:
        obj = json.loads(out)
    except json.JSONDecodeError as e:
        raise KDError(f"cannot read W&B run folder {folder}: `wandb leet inspect --summary --json` printed "
                      f"no JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not obj.get("run_id"):
        raise KDError(f"cannot read W&B run folder {folder}: its summary names no run_id")
    return {k: obj.get(k) for k in ("run_id", "name", "start_time", "state", "config", "summary")}


def inspect_history(folder: Path) -> list[dict]:
    """History rows of ``wandb leet inspect --json`` (records of type "history"), each with ``_step``."""
    rows = []
    for n, line in enumerate(leet_inspect(folder, summary=False).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise KDError(f"cannot read W&B run folder {folder}: record {n} is not JSON ({e.msg})") from None
        if rec.get("type") != "history":
            continue
        hist = rec.get("history", {})
        item = hist.get("item", {})
        step = item.get("_step", hist.get("step", {}).get("num", 0))
        rows.append({**clean(item), "_step": int(step)})
    return rows


def time_key(start_time: str | None, folder: Path) -> tuple:
    """Sort key from an RFC 3339 start time (fraction padded to ns), the folder name breaking ties."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", start_time or "")
    if not m:
        return ("", folder.name)
    return (m.group(1) + "." + (m.group(2) or "").ljust(9, "0")[:9], folder.name)
