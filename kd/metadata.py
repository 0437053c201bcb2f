"""The one reader of every metadata file: a JSON object of a declared :class:`Shape`, read within bounds.

Every JSON file the repository reads (store pointers and manifests, weights ``meta.json``, ``run.json``,
``done.json``, checkpoint pointers, a pool's ``pool.json`` and ``shards/index.json``, the teacher cache's metadata,
a run's claim in the store, the sweep runner's state, the report's caches) goes through :func:`read_json` with the
shape of its kind. Whatever else is there is one :class:`~kd.errors.KDError` naming the file, what it should hold
and what to do about it, never a traceback:

* not a regular file (a folder, a device such as ``/dev/zero``, a pipe: never read), or larger than its kind may
  be (``Shape.max_bytes``: never read whole);
* not UTF-8 JSON, or nested deeper than :data:`MAX_DEPTH`;
* a number out of range: an integer of more than :data:`MAX_INT_DIGITS` digits, a literal that overflows a float;
* not an object, a required key missing, a key of the wrong type or outside its range (:class:`Within`), an
  object or list whose members are of the wrong shape (a nested :class:`Shape`, :class:`Each`).

This module imports nothing but the standard library and :mod:`kd.errors` (the sweep runner reads its state
without torch).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kd.errors import KDError

MAX_BYTES = 4 << 20  # a metadata file of the small kinds: far above any the repository writes
LARGE = 256 << 20  # files that grow with a run's history (checkpoint pointers) or a study (caches, sweep state)
MAX_DEPTH = 64  # nesting: every file the repository writes is a few levels deep
MAX_INT_DIGITS = 20  # a count, step, seed, size or time the repository writes fits in 64 bits


@dataclass(frozen=True)
class Within:
    """A number of ``types`` in [lo, hi] (None: unbounded)."""

    types: type | tuple = int
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Each:
    """A list whose every item, or an object whose every value, is ``spec`` (a type, :class:`Within` or
    :class:`Shape`)."""

    spec: object
    container: type = dict


@dataclass(frozen=True)
class Shape:
    """What a metadata file must hold: a JSON object with ``required`` keys (and ``optional`` ones when present),
    each a type (or tuple of types), :class:`Within`, :class:`Each` or a nested :class:`Shape`; ``what`` names it
    in the one-line refusal, ``fix`` says what to do about a wrong one; ``max_bytes`` bounds the file."""

    what: str
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)
    fix: str = "delete it and rerun"
    max_bytes: int = MAX_BYTES


_NONE = type(None)
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", _NONE: "null", object: "anything"}


class _Refused(ValueError):
    """A value the parser met that no metadata file may hold."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:24]}{'...' if len(text) > 24 else ''}, beyond a float's range")
    return value


def json_kind(value) -> str:
    for t in (bool, int, float, str, list, dict, _NONE):
        if isinstance(value, t):
            return _TYPE_NAMES[t]
    return type(value).__name__


def _read_bytes(path: Path, shape: Shape, should: str) -> bytes:
    """The file's bytes, opened without blocking (a pipe) and read only when it is a regular file within
    ``shape.max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KDError(f"missing file {path}") from None
    except OSError as e:
        raise KDError(f"cannot read {path} ({e.strerror or type(e).__name__}): {should}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise KDError(f"{path} is a folder, not a file: {should}")
        raise KDError(f"{path} is not a regular file (a device, pipe or socket): {should}")
    with os.fdopen(fd, "rb") as fh:
        try:
            raw = fh.read(shape.max_bytes + 1)
        except OSError as e:
            raise KDError(f"cannot read {path} ({e.strerror or type(e).__name__}): {should}") from None
    if len(raw) > shape.max_bytes:
        raise KDError(f"{path} is larger than the {shape.max_bytes >> 20} MiB {shape.what} may take (not read "
                      f"further): {should}")
    return raw


def _depth(data) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def parse_json(raw: bytes, path: Path, should: str):
    """``raw`` as JSON within the bounds above (any refusal one KDError naming ``path``)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_int=_parse_int, parse_float=_parse_float)
    except UnicodeDecodeError:
        raise KDError(f"{path} is not JSON text (binary bytes): {should}") from None
    except json.JSONDecodeError as e:
        raise KDError(f"corrupt JSON in {path} ({e.msg} at line {e.lineno}): {should}") from None
    except _Refused as e:
        raise KDError(f"{path} holds {e}: {should}") from None
    except (RecursionError, ValueError) as e:  # nesting beyond the parser's stack; a number int() refuses
        why = f"JSON nested deeper than {MAX_DEPTH} levels" if isinstance(e, RecursionError) else \
            "a number out of range"
        raise KDError(f"{path} holds {why}: {should}") from None
    if _depth(data) > MAX_DEPTH:
        raise KDError(f"{path} holds JSON nested deeper than {MAX_DEPTH} levels: {should}")
    return data


def _want(spec) -> str:
    if isinstance(spec, Shape):
        return spec.what
    if isinstance(spec, Within):
        bounds = f"{'-inf' if spec.lo is None else spec.lo} to {'inf' if spec.hi is None else spec.hi}"
        return f"{_want(spec.types)} from {bounds}"
    if isinstance(spec, Each):
        return f"{_TYPE_NAMES[spec.container]} of {_want(spec.spec)}"
    types = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in types)


def _fits(value, spec) -> str | None:
    """None if ``value`` is ``spec``, else what is wrong (the inner key of a nested shape first)."""
    if isinstance(spec, Shape):
        return _problem(value, spec)
    if isinstance(spec, Each):
        if not isinstance(value, spec.container):
            return f"is {json_kind(value)}, not {_want(spec)}"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            wrong = _fits(item, spec.spec)
            if wrong:
                return f"[{key!r}] {wrong}"
        return None
    if isinstance(spec, Within):
        wrong = _fits(value, spec.types)
        if wrong:
            return wrong
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            return f"is {value}, not {_want(spec)}"
        return None
    types = spec if isinstance(spec, tuple) else (spec,)
    if object in types:
        return None
    ok = not (isinstance(value, bool) and bool not in types)  # JSON true is not a count
    ok = ok and (isinstance(value, types) or (isinstance(value, int) and float in types))
    return None if ok else f"is {json_kind(value)}, not {_want(spec)}"


def _problem(data, shape: Shape) -> str | None:
    if not isinstance(data, dict):
        return f"holds {json_kind(data)}, not {shape.what}"
    for key, spec in (*shape.required.items(), *shape.optional.items()):
        if key not in data:
            if key in shape.required:
                return f"has no {key!r}"
            continue
        wrong = _fits(data[key], spec)
        if wrong:
            return f"{key!r} {wrong}"
    return None


def check_shape(data, path: Path, shape: Shape) -> dict:
    """``data`` (parsed) against ``shape``; the one-line refusal names ``path``."""
    should = f"it should hold {shape.what}: {shape.fix}"
    if not isinstance(data, dict):
        raise KDError(f"{path} holds {json_kind(data)}, not a JSON object: {should}")
    wrong = _problem(data, shape)
    if wrong:
        sep = " " if wrong.startswith("has no") else ": "
        raise KDError(f"{path}{sep}{wrong}: {should}")
    return data


def read_json(path: str | Path, shape: Shape) -> dict:
    """The JSON object in ``path``, read within the bounds of ``shape`` and checked against it (module
    docstring)."""
    path = Path(path)
    should = f"it should hold {shape.what}: {shape.fix}"
    return check_shape(parse_json(_read_bytes(path, shape, should), path, should), path, shape)


# ------------------------------------------------------------------------------------------------ the shapes
OBJECT = Shape("a JSON object")
POINTER = Shape('a store pointer {"version": "vN"}', {"version": str},
                fix="publish the artifact again, or delete the file")
MANIFEST = Shape("an artifact manifest (name, type, version, files)",
                 {"name": str, "type": str, "version": str, "files": Each(str)},
                 {"metadata": dict, "aliases": Each(str, list), "run_id": (str, _NONE)},
                 fix="delete its version folder and publish it again")
WEIGHTS_META = Shape("weights metadata (sha256, file, arch, dataset, num_classes)", {"sha256": str},
                     {"file": str, "arch": str, "dataset": str, "num_classes": Within(int, 1, 1_000_000)},
                     fix="publish the weights again")
RUN_ID = Shape('a run id {"run_id": "..."}', {"run_id": str}, fix="delete it (or pass --resume=False)")
DONE = Shape("a finished run's marker (run_id, summary)", {"run_id": str},
             {"summary": dict, "artifact": str, "store_path": str, "wandb": str, "fingerprint": str},
             fix="delete it to train the run (or pass --resume=False)")
POOL = Shape("pool metadata (sha256, count, dataset)", {"sha256": str},
             {"count": Within(int, 0, 10**9), "dataset": str, "num_classes": Within(int, 1, 1_000_000),
              "model": str, "fid": (float, int, _NONE), "fid_features": (str, _NONE)},
             fix="generate the pool again with `python -m kd.synthetic generate`")
SHARD = Shape("a shard entry (count, sha256)", {"count": Within(int, 1, 10**9), "sha256": str})
SHARD_INDEX = Shape("a pool's shard index (identity, shards)", {"identity": dict, "shards": Each(SHARD)},
                    fix="delete the shards folder to generate them again")
GENERATOR = Shape("generator metadata (kind, preset, file, sha256)", {},
                  {"kind": str, "preset": dict, "sha256": str, "file": str, "step": Within(int, 0, 10**12),
                   "identity": dict},
                  fix="train or publish the generator again")
CACHE_META = Shape("teacher-cache metadata (sha256, dtype)", {"sha256": str}, {"dtype": str},
                   fix="delete the cache file and its .json to rebuild it, or pass --teacher_cache=False")
REPORT_CACHE = Shape("the report's cache (version, entries or runs)", {},
                     {"version": int, "entries": dict, "runs": list, "fingerprint": list},
                     fix="delete it (the report then reads every run again)", max_bytes=LARGE)
SWEEP_STATE = Shape("the sweep runner's state (spec, runs)", {},
                    {"version": int, "spec_sha256": str, "runs": Each(dict, list)},
                    fix="delete that state folder to start the sweep's bookkeeping over", max_bytes=LARGE)
