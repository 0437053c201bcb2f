"""Errors a user can fix, and the one way every command reports them.

* :class:`KDError`: printed as one line (``error: ...``), exit code 2, nothing written.
* :class:`Interrupted`: SIGTERM or SIGINT arrived; a checkpoint was written; exit 143 (TERM) or 130 (INT).
* :func:`cli`: the handler every entry point (``train.py``, ``distill.py``, ``python -m kd.*``) runs under.
* :class:`ArgumentParser`: argparse whose usage errors are one line and exit code 2, like a KDError.
* :func:`check_name`: artifact, study and run names that cannot escape a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # match at the start, \Z: no trailing newline


class KDError(Exception):
    """An error a user can fix: printed as one line, exit code 2."""


class AlreadyDone(Exception):
    """Another process finished this run while this one waited for it: one line, exit code 0."""


class Interrupted(Exception):
    """A stop signal arrived: the process exits 128 + signal number. ``saved``: the training loop wrote a
    checkpoint first (a stop outside training, e.g. during set-up, has nothing to save)."""

    def __init__(self, signum: int = signal.SIGTERM, saved: bool = True):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = int(signum), saved


def _stop_now(signum, frame):
    raise Interrupted(signum, saved=False)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after an option's help, unless the help already says its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the ``python -m kd.*`` commands: a usage error is one line and exit code 2, like KDError;
    ``--help`` shows every default; every option is spelled as the programs spell theirs (``--dry_run``), and
    the dashed spelling (``--dry-run``) is accepted too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        if names and all(n.startswith("--") for n in names):
            spelled = {("--" + n[2:].replace("-", "_")) for n in names} | {("--" + n[2:].replace("_", "-"))
                                                                             for n in names}
            first = "--" + names[0][2:].replace("-", "_")
            if "dest" not in kwargs:
                kwargs["dest"] = first[2:]
            names = (first, *sorted(spelled - {first}))
        return super().add_argument(*names, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}: see {self.prog} --help\n")


def one_line(text: str) -> str:
    """``text`` on one line, printable whatever the terminal's encoding (a character it cannot show, or a
    surrogate escape of a non-UTF-8 path, as a backslash escape)."""
    text = " ".join(str(text).split())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception in a few words for a one-line error: its message's first line (at most ``limit``
    characters), else its type's name. The one formatter of what a library (W&B, diffusers, torch) raised."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def check_name(value: str, what: str) -> str:
    """Artifact, study and run names: no path separators, no '..', nothing that escapes a folder."""
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise KDError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only "
            "(no '/', no '..', at most 128 characters)"
        )
    return value


def say(text: str) -> None:
    """``text`` as one line on stderr in one write: the processes of one run share the terminal, and their lines
    must not interleave (print writes the text and its newline apart)."""
    import os

    sys.stderr.flush()
    data = (text + "\n").encode(sys.stderr.encoding or "utf-8", errors="backslashreplace")
    try:
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError, AttributeError):  # a stderr without a file descriptor (captured, in tests)
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def cli():
    """Entry points: KDError -> one line, exit 2; Interrupted -> one line, exit 128 + signal; Ctrl-C before
    any checkpoint exists -> one line, exit 130 (no traceback). SIGTERM and SIGINT stop the program at any moment
    (the training loop defers them to its next step, :func:`stop_requests`)."""
    import threading

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, _stop_now) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except KDError as e:
        say(f"error: {one_line(e)}")
        raise SystemExit(2) from None
    except AlreadyDone as e:
        print(one_line(e), flush=True)
        raise SystemExit(0) from None
    except Interrupted as e:
        if e.saved:
            say(f"interrupted by {e}: checkpoint saved; run the same command again to resume")
        else:
            say(f"interrupted by {e} outside training (nothing to checkpoint); run the same command again")
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        print("interrupted by SIGINT before anything was checkpointed; run the same command again",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_requests():
    """SIGTERM and SIGINT, while inside, only append their number to the yielded list: the training loop
    checkpoints at its next step and raises :class:`Interrupted` (exit 143 or 130). Outside the main thread
    (where signals cannot be caught) the list stays empty."""
    import threading

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
