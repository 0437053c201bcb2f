"""The study's runs as :class:`Run` objects, read from the offline W&B run folders on disk.

Every ``offline-run-*`` folder is read with W&B's own reader (:mod:`kd.wandb_runs`, ``wandb leet inspect``):
config, summary, start time and run id, and for finished students the history rows too. Folders that share
a run id (a resumed run) are merged in start-time order; a step logged twice keeps its last row.

A folder the reader cannot read (a run killed before its first record, so its ``.wandb`` file holds only
its header; a truncated or foreign file; no ``.wandb`` file; ``wandb leet inspect`` failing on it) is
skipped with one warning that names it: it never blocks the report.

What was read is cached per ``.wandb`` file (its size and mtime) in ``<cache_dir>/offline-inspect.json``
(:class:`InspectCache`); ``--refresh`` ignores the cache.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kd import names
from kd.errors import KDError, one_line
from kd.io import REPORT_CACHE, read_json, write_json
from kd.wandb_runs import clean, inspect_history, inspect_summary, offline_folders, time_key, transaction_log, wandb_exe

CACHE_VERSION = 1


def warn(warnings: list[str], msg: str) -> None:
    """Record a warning and print it as one line on stderr."""
    msg = one_line(msg)
    warnings.append(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One W&B run (all its offline folders merged); ``sources`` are the folders in time order, or a URL;
    ``time`` (seconds since the epoch) is when it last logged, which decides the newest of duplicates."""

    id: str
    name: str
    config: dict
    summary: dict
    history: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    time: float | None = None

    @property
    def job(self) -> str | None:
        return self.config.get(names.JOB)

    @property
    def finished(self) -> bool:
        return self.summary.get(names.FINAL) is True

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})"

    def value(self, key: str):
        """Final value of ``key``: the summary, else the last history row holding it, else None."""
        if key in self.summary:
            return self.summary[key]
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return None


def epoch_seconds(stamp) -> float | None:
    """A time as seconds since the epoch: a number as it is, an ISO 8601 string (naive = UTC), else None."""
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        return float(stamp)
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def run_time(raw_summary: dict | None, *stamps) -> float | None:
    """When a run last logged: its summary's ``_timestamp``, else the first of ``stamps`` that parses."""
    for stamp in ((raw_summary or {}).get("_timestamp"), *stamps):
        t = epoch_seconds(stamp)
        if t is not None:
            return t
    return None


class InspectCache:
    """What `wandb leet inspect` said about each .wandb file, reused while the file's size and mtime stay."""

    def __init__(self, path: Path | None, refresh: bool, warnings: list[str] | None):
        self.path, self.entries, self.dirty = path, {}, False
        if path is not None and path.is_dir():
            read_json(path, REPORT_CACHE)  # a folder where the cache file goes: one line, before any work
        if path is None or refresh or not path.exists():
            return
        try:
            data = read_json(path, REPORT_CACHE)
        except KDError as e:  # a cache: rebuilt, not refused
            if warnings is not None:
                warn(warnings, f"ignoring unreadable cache ({one_line(e)}); reading every run folder again")
            return
        if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            self.entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    @staticmethod
    def _stamp(folder: Path) -> tuple[str, list[int]]:
        log = transaction_log(folder)
        st = log.stat()
        return str(log.resolve()), [st.st_size, st.st_mtime_ns]

    def get(self, folder: Path, what: str):
        key, stamp = self._stamp(folder)
        entry = self.entries.get(key)
        if entry and entry.get("stamp") == stamp and what in entry:
            return entry[what]
        return None

    def put(self, folder: Path, what: str, value) -> None:
        key, stamp = self._stamp(folder)
        entry = self.entries.get(key)
        if not entry or entry.get("stamp") != stamp:
            entry = self.entries[key] = {"stamp": stamp}
        entry[what] = value
        self.dirty = True

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.entries = {k: v for k, v in self.entries.items() if Path(k).exists()}  # drop deleted runs
            write_json(self.path, {"version": CACHE_VERSION, "entries": self.entries})


def _reason(folder: Path, error: KDError) -> str:
    """The reader's error without its 'cannot read W&B run folder X: ' prefix."""
    text = one_line(error)
    prefix = f"cannot read W&B run folder {folder}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _read_summary(folder: Path) -> dict:
    s = inspect_summary(folder)
    if not isinstance(s.get("config"), dict) or not isinstance(s.get("summary"), dict):
        raise KDError(f"cannot read W&B run folder {folder}: its summary holds no config or summary object")
    return s


def _inspect_all(folders: list[Path], what: str, cache: InspectCache,
                 unreadable: dict[Path, str]) -> dict[Path, object]:
    """``what`` ("summary" or "history") of each folder, from the cache or the reader (in parallel); a
    folder that cannot be read is left out and its reason put in ``unreadable``."""
    fn = _read_summary if what == "summary" else inspect_history

    def read(folder: Path):
        try:
            hit = cache.get(folder, what)
            if hit is not None:
                return hit, False
            return fn(folder), True
        except KDError as e:
            return KDError(_reason(folder, e)), False

    out = {}
    workers = max(1, min(len(folders), 2 * (os.cpu_count() or 1), 8))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f, (value, fresh) in zip(folders, pool.map(read, folders)):
            if isinstance(value, KDError):
                unreadable.setdefault(f, str(value))
                continue
            if fresh:
                cache.put(f, what, value)
            out[f] = value
    return out


def skip_message(folder: Path, reason: str) -> str:
    return (f"skipping unreadable W&B run folder {folder} ({reason}): if its run was resumed, its data is in "
            f"a later folder; delete {folder} to silence this")


def _merge(run_id: str, parts: list[Path], summaries: dict) -> Run:
    parts.sort(key=lambda f: time_key(summaries[f].get("start_time"), f))
    config, summary, name = {}, {}, run_id
    for f in parts:
        s = summaries[f]
        config.update(clean(s.get("config")))
        summary.update(clean(s.get("summary")))
        name = s.get("name") or name
    last = summaries[parts[-1]]
    return Run(id=run_id, name=name, config=config, summary=summary, sources=[str(f) for f in parts],
               time=run_time(last.get("summary"), last.get("start_time")))


def _merge_history(run: Run, histories: dict) -> None:
    merged: dict[int, dict] = {}
    for f in run.sources:
        for row in histories.get(Path(f), []):
            merged[row["_step"]] = row  # a step logged again (a resume) keeps its last row
    run.history = [merged[s] for s in sorted(merged)]


def read_offline(study: str, wandb_dir: str | Path, cache: InspectCache,
                 warnings: list[str] | None) -> tuple[list[Run], dict[Path, str]]:
    """Every run of ``study`` under ``wandb_dir`` (resumed folders merged, history read for finished
    students) and the folders that could not be read, each with its reason (each warned about once in
    ``warnings``; ``None``: not warned)."""
    folders = offline_folders(wandb_dir)
    if folders:
        wandb_exe()  # no reader at all is an error, not a reason to skip every folder
    unreadable: dict[Path, str] = {}
    summaries = _inspect_all(folders, "summary", cache, unreadable)
    by_id: dict[str, list[Path]] = {}
    for f in folders:
        if f in summaries:
            by_id.setdefault(summaries[f]["run_id"], []).append(f)
    runs = [run for run_id, parts in sorted(by_id.items())
            if (run := _merge(run_id, parts, summaries)).config.get(names.STUDY) == study]
    students = [r for r in runs if r.finished and r.job == names.STUDENT]  # teachers: the summary will do
    histories = _inspect_all([Path(f) for r in students for f in r.sources], "history", cache, unreadable)
    for run in students:
        _merge_history(run, histories)
    if warnings is not None:
        for folder, reason in unreadable.items():
            warn(warnings, skip_message(folder, reason))
    return runs, unreadable


def unreadable_note(unreadable: dict[Path, str], most: int = 3) -> str:
    """A clause for the 'no finished runs' error: which folders could not be read, and why."""
    if not unreadable:
        return ""
    shown = "; ".join(f"cannot read W&B run folder {f}: {why}" for f, why in list(unreadable.items())[:most])
    more = f"; and {len(unreadable) - most} more" if len(unreadable) > most else ""
    return f" ({len(unreadable)} unreadable run folder(s) skipped: {shown}{more})"
