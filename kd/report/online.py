"""The study's runs from the W&B public API, cached until W&B's runs change.

* One listing (``Api.runs(entity/project, filters={"config.study": study}, per_page=500, lazy=False)``)
  brings each run's config and summary with the listing itself: no request per run. Every figure plots
  final values, so they are read from the run's summary; no history is pulled.
* The cache, ``<cache_dir>/<entity>-<project>-<study>.json``, keeps the runs and a fingerprint of each:
  (id, state, heartbeatAt, historyLineCount). The next report lists the runs again lightweight (``lazy=True``:
  no config nor summary) and reuses the cache while no fingerprint changed (no run added, removed, resumed or
  finished since). Else it lists, in full, only the runs that changed, by id (``name $in [...]``), in one
  listing of its own, and keeps the cached others: never a request per run. (Asking the same ``wandb.Api``
  for the full listing with the lazy listing's filters would reuse that lazy listing and load each run's
  config on its own: ``Runs.upgrade_to_full``.) ``--refresh`` always pulls everything. The cache is written
  only once the figures are (:meth:`OnlineCache.save`).
* Any API failure (no such entity or project, no permission, no network) is one line that names the fix.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

from kd import names
from kd.errors import KDError, first_line, one_line
from kd.io import REPORT_CACHE, read_json, write_json
from kd.report.runs import Run, run_time
from kd.wandb_runs import clean

PER_PAGE = 500
CACHE_VERSION = 2
_AUTH = ("permission", "401", "403", "unauthori", "forbidden", "api key", "authenticat", "not logged", "login")
_MISSING = ("not found", "could not find", "404", "does not exist", "no such")


def api_errors() -> tuple[type[BaseException], ...]:
    """What a W&B API call raises when it fails: wandb's errors, ValueError, OSError (requests' errors
    and socket errors are OSErrors) and wandb-core's request failure."""
    import wandb

    errors = [wandb.errors.Error, ValueError, OSError]
    try:
        from wandb.sdk.lib.service.service_connection import WandbApiFailedError
    except ImportError:  # another SDK version
        pass
    else:
        errors.append(WandbApiFailedError)
    return tuple(errors)


def api_failure(e: BaseException, doing: str, entity: str | None, project: str | None) -> KDError:
    """One line: what failed, W&B's reason and the fix."""
    why = one_line(first_line(e, 10_000))
    low = f"{why} {type(e).__name__}".lower()
    if any(w in low for w in _AUTH):
        who = f" as a user who can read {entity}/{project}" if entity else ""
        fix = f"run `wandb login` (or set WANDB_API_KEY){who}"
    elif entity and any(w in low for w in _MISSING):
        fix = f"check --entity={entity} and --project={project}: the project must exist and hold the study's runs"
    elif isinstance(e, OSError):
        fix = "check the network connection to W&B, or pass --offline to read the runs on disk"
    elif not entity:
        fix = "pass --entity=NAME (your W&B user or team), or run `wandb login`"
    else:
        fix = "check --entity, --project and `wandb login`, or pass --offline to read the runs on disk"
    return KDError(f"W&B API: cannot {doing} ({why[:300]}): {fix}; nothing was written")


def default_entity() -> str | None:
    import wandb

    try:
        return wandb.Api(timeout=60).default_entity
    except api_errors() as e:
        raise api_failure(e, "find your default W&B entity", None, None) from None


def _plain(v):
    """JSON-safe copy of a value from the W&B API (nested dict-likes become dicts)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _print(r) -> list[str]:
    return [str(r.id), str(r.state), str(getattr(r, "heartbeat_at", None)), str(getattr(r, "history_line_count", None))]


def fingerprint(listing) -> list[list[str]]:
    """What changes when a run is added, removed, resumed, logs or finishes; the lightweight listing has it."""
    return sorted(_print(r) for r in listing)


def to_run(r) -> Run:
    """A public-API run (of a full listing: config and summary already loaded) -> :class:`Run`."""
    raw = _plain(r.summary_metrics) or {}
    return Run(id=str(r.id), name=str(r.name or r.id), config=clean(_plain(r.config)), summary=clean(raw),
               sources=[str(r.url)], time=run_time(raw, getattr(r, "heartbeat_at", None),
                                                   getattr(r, "created_at", None)))


class OnlineCache:
    """The runs of one listing and its fingerprint, as JSON; written by :meth:`save` only."""

    def __init__(self, path: Path, refresh: bool):
        self.path, self.pending = Path(path), None
        if self.path.is_dir():
            read_json(self.path, REPORT_CACHE)  # a folder where the cache file goes: one line, before any work
        self.data = None if refresh else self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            data = read_json(path, REPORT_CACHE)
            runs = [Run(**r) for r in data["runs"]]
        except (KDError, ValueError, TypeError, KeyError):  # absent, corrupt or of another version: pull
            return None
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("fingerprint"), list):
            return None
        return {**data, "runs": runs}

    def save(self) -> None:
        if self.pending is not None:
            write_json(self.path, self.pending)


def _listing(api, entity: str, project: str, filters: dict, lazy: bool):
    return api.runs(f"{entity}/{project}", filters=filters, per_page=PER_PAGE, lazy=lazy)


def _update(api, entity: str, project: str, where: dict, cache: OnlineCache):
    """The runs from the cache and, listed in full, those whose fingerprint changed; None when none did.
    Returns (runs, fingerprint, number of runs listed again)."""
    light = list(_listing(api, entity, project, where, lazy=True))
    if fingerprint(light) == cache.data["fingerprint"]:
        return None
    known = {tuple(f) for f in cache.data["fingerprint"]}
    cached = {r.id: r for r in cache.data["runs"]}
    changed = [str(r.id) for r in light if tuple(_print(r)) not in known or str(r.id) not in cached]
    fresh, stale = {}, set(changed)
    if changed:
        ids = {"name": {"$in": changed}}
        fresh = {str(r.id): r for r in _listing(api, entity, project, {"$and": [where, ids]}, lazy=False)}
    runs, prints = [], []
    for r in light:
        rid = str(r.id)
        if rid in fresh:
            runs.append(to_run(fresh[rid]))
            prints.append(_print(fresh[rid]))
        elif rid not in stale:
            runs.append(cached[rid])
            prints.append(_print(r))
    return runs, sorted(prints), len(changed)


def read_online(study: str, entity: str, project: str, cache: OnlineCache) -> tuple[list[Run], str]:
    """Runs of ``study`` in ``entity/project`` (the cache's while W&B's runs are unchanged) and a note."""
    import wandb

    where = {f"config.{names.STUDY}": study}
    try:
        api = wandb.Api(timeout=60)
        if cache.data is not None:
            got = _update(api, entity, project, where, cache)
            if got is None:
                return cache.data["runs"], (f"W&B's runs of study {study} are unchanged since "
                                            f"{cache.data.get('pulled_at', '?')}: using {cache.path} "
                                            "(--refresh pulls again)")
        else:
            listing = list(_listing(api, entity, project, where, lazy=False))
            got = [to_run(r) for r in listing], fingerprint(listing), len(listing)
    except api_errors() as e:
        raise api_failure(e, f"list the runs of {entity}/{project}", entity, project) from None
    runs, printed, pulled_n = got
    pulled = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cache.pending = {"version": CACHE_VERSION, "entity": entity, "project": project, "study": study,
                     "pulled_at": pulled, "fingerprint": printed, "runs": [asdict(r) for r in runs]}
    if cache.data is not None and not pulled_n:
        return runs, (f"{len(cache.data['runs']) - len(runs)} run(s) of study {study} removed from W&B since "
                      f"{cache.data.get('pulled_at', '?')}: the others from {cache.path}")
    if cache.data is not None:
        return runs, (f"{pulled_n} run(s) of study {study} new or changed on W&B since "
                      f"{cache.data.get('pulled_at', '?')}: pulled those from {entity}/{project}, "
                      f"{len(runs) - pulled_n} from {cache.path}")
    return runs, f"pulled {len(runs)} runs of study {study} from {entity}/{project}"
