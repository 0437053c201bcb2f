"""The one flag system of every command: dataclass fields that declare themselves once, parsed from ``--key=value``.

Each field of a command's settings dataclass is declared with :func:`setting`: its meaning, its allowed values or
range, its default, whether it belongs to a run's identity (what the numbers depend on: the fingerprint that
names the run folder), whether the members of a pack may differ in it, and whether it is a positional argument.
Validation (:func:`check_fields`), ``--help`` (:func:`usage`), the run's identity (:func:`identity`) and the
parser (:func:`parse_flags`) are all generated from that. For the training programs the flags *are* the W&B config:
a W&B sweep passes its parameters back as ``--key=value`` (booleans as ``True``/``False``).

The parser takes ``--key=value``, ``--key value``, ``--flag`` (a boolean: True), the dashed spelling
``--dry-run`` of ``--dry_run``, and positional arguments for fields declared positional. Unknown flags, a flag
given twice, wrong types, out-of-range values and values that are not UTF-8 text (a path of other bytes, which
``sys.argv`` holds as surrogate escapes) are refused with one line that names the problem and the fix
(:class:`~kd.errors.KDError`, exit code 2). The parser also checks the test-only ``KD_FAULT``
(:func:`kd.faults.check`), so every command refuses a malformed one before it writes anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import field, fields

from kd import faults, names
from kd.errors import KDError, check_name

SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds up to this
REQUIRED = dataclasses.MISSING  # the default of a setting that must be given
# keys W&B hands back on resume (the stored config) that the programs add themselves: ignored, with one line
RUN_KEYS = {names.JOB, names.RUN_NAME, names.TEACHER_NAMES, names.TEACHER_HASHES, names.TEACHER_VERSIONS,
            names.SYNTHETIC_POOL_SHA, names.SYNTHETIC_SOURCE, names.SYNTHETIC_FID, names.SYNTHETIC_DRAW,
            names.SYNTHETIC_FID_AUTHORS, names.SEED_USED,
            names.INIT_SHA, "n_real", "n_synthetic",
            "n_params", "n_train", "wandb_version", "recipe"}  # recipe: a generator run's resolved preset


def fingerprint(identity: dict) -> str:
    """10 hex digits of the sha256 of a configuration's identity (JSON, keys sorted): names its run folder."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def setting(default, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
            choices=None, name: bool = False, identity=True, packs: bool | None = None, positional: bool = False,
            switches: tuple = (), resolve=None):
    """A field with its documentation and allowed values (checked by :func:`check_fields`).

    ``choices``: the allowed values (a registry dict allows its keys, read when checked: a name registered later
    counts). ``name``: a name that cannot leave a folder. ``identity``: whether the field belongs to a run's
    identity: True, False (where it is written, how it is resumed or timed), ``"non_default"`` (a field added
    after runs were made: left out while at its default, so those runs keep their fingerprint) or a function of
    the config (e.g. the pool of a real-data-only run does not count). ``packs``: True, the members of one pack
    may differ in it (a seed, a temperature); False, they must agree (the default of an identity field; a field
    outside the identity, such as the device, is ignored unless declared False). ``switches``: choice values that are
    also flags of their own (``--online`` for ``--mode=online``). ``resolve``: a function of the config giving the
    value the identity records (an ``auto`` resolved for this machine), so a fingerprint is the same whether
    computed before or after the config's ``auto`` values are resolved."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "name": name, "identity": identity, "packs": packs, "positional": positional, "switches": switches,
            "resolve": resolve}
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return " | ".join(map(str, m["choices"]))
    if m.get("name"):
        return "a name: letters, digits, . _ -"
    if m.get("lo") is None and m.get("hi") is None:
        return ""
    lo = "-inf" if m["lo"] is None else _num(m["lo"])
    hi = "inf" if m["hi"] is None else _num(m["hi"])
    return f"{'(' if m['lo_open'] else '['}{lo}, {hi}{')' if m['hi_open'] else ']'}"


def check_fields(cfg) -> None:
    """Every field against its declared choices, range or name rule."""
    for f in fields(cfg):
        m, v = f.metadata, getattr(cfg, f.name)
        if not m:
            continue
        if m.get("choices") and str(v) not in map(str, m["choices"]):
            options = [str(c) for c in m["choices"]]
            if f.name == "dataset":
                raise KDError(f"unknown dataset {v!r}: choose one of {', '.join(sorted(options))}")
            listed = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
            raise KDError(f"--{f.name} must be {listed}, got {v!r}")
        if m.get("name") and v != "":
            check_name(v, f.name)
        if m.get("lo") is None and m.get("hi") is None:
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or (m["lo"] is not None and (v <= m["lo"] if m["lo_open"] else v < m["lo"]))
        bad = bad or (m["hi"] is not None and (v >= m["hi"] if m["hi_open"] else v > m["hi"]))
        if bad:
            raise KDError(f"--{f.name} must be {_rule(f)}, got {v} ({m['help']})")


def identity(cfg) -> dict:
    """The fields that define what a run computes, as their declarations say (:func:`setting`'s ``identity``)."""
    out = {}
    for f in fields(cfg):
        rule, value = f.metadata.get("identity", True), getattr(cfg, f.name)
        if rule is False or (rule == "non_default" and value == f.default):
            continue
        if callable(rule) and not rule(cfg):
            continue
        out[f.name] = f.metadata["resolve"](cfg) if f.metadata.get("resolve") else value
    return out


def pack_keys(cls) -> tuple[str, ...]:
    """The fields the members of one pack must agree in (:func:`setting`'s ``packs``)."""
    def same(f) -> bool:
        packs = f.metadata.get("packs")
        return packs is False or (packs is None and f.metadata.get("identity", True) is not False)

    return tuple(f.name for f in fields(cls) if same(f))


def pack_key(cfg) -> tuple:
    """What a config must share with the other members of its pack: (field, value) for :func:`pack_keys`; an
    identity field its own rule leaves out (the pool of a real-data-only run) counts as None."""
    ident = identity(cfg)
    out = []
    for f in fields(cfg):
        if f.name not in pack_keys(type(cfg)):
            continue
        in_identity = f.metadata.get("identity", True) is not False
        out.append((f.name, ident.get(f.name) if in_identity else getattr(cfg, f.name)))
    return tuple(out)


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _rule(f: dataclasses.Field) -> str:
    """``a finite number > 0 and <= 10``, ``>= 1 and <= 10000``: the range in words."""
    m = f.metadata
    parts = []
    if m["lo"] is not None:
        parts.append(f"{'>' if m['lo_open'] else '>='} {_num(m['lo'])}")
    if m["hi"] is not None:
        parts.append(f"{'<' if m['hi_open'] else '<='} {_num(m['hi'])}")
    return ("a finite number " if _type(f) is float else "") + " and ".join(parts)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type(f: dataclasses.Field):
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]


def _convert(f: dataclasses.Field, raw: str, flag: str):
    t = _type(f)
    low = raw.lower()
    if t is bool:
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise KDError(f"--{flag} expects True or False, got {raw!r}")
    if t is int:
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            as_float = float(raw)  # 1e3, 2.0: W&B and YAML write some integers so
        except ValueError:
            raise KDError(f"--{flag} expects an integer, got {raw!r}") from None
        if not as_float.is_integer():
            raise KDError(f"--{flag} expects an integer, got {raw!r}")
        return int(as_float)
    if t is float:
        try:
            return float(raw)
        except ValueError:
            raise KDError(f"--{flag} expects a number, got {raw!r}") from None
    if f.metadata.get("choices") and {"True", "False"} <= set(map(str, f.metadata["choices"])):
        return "True" if low in _TRUE else "False" if low in _FALSE else raw  # e.g. --resume=true
    return raw


def _split(argv: list[str], known: dict) -> tuple[list[tuple[str, str | None]], list[str], list[str]]:
    """``--key=value`` / ``--key value`` / ``--flag`` into (key, raw) pairs, W&B's own keys passed back, and the
    positional arguments."""
    pairs, ignored, positional, i = [], [], [], 0
    switches = {s: f.name for f in known.values() for s in f.metadata.get("switches", ())}
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in switches and not eq:
            pairs.append((switches[key], key))
        elif key not in known and (key in RUN_KEYS or key.startswith("_wandb")):
            ignored.append(key)
        elif key not in known or known[key].metadata.get("positional"):
            close = [k for k in known if k.startswith(key[:3]) and not known[k].metadata.get("positional")]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise KDError(f"unknown flag --{key}{hint}: see --help for the {len(known)} known settings")
        elif not eq and _type(known[key]) is not bool:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                raw = argv[i]
            else:
                raise KDError(f"--{key} needs a value: write --{key}=VALUE")
            pairs.append((key, raw))
        else:
            pairs.append((key, raw if eq else "True"))
        i += 1
    return pairs, ignored, positional


def parse_flags(cls, argv: list[str] | None = None, notes: bool = True):
    """``argv`` into a validated ``cls`` instance (see the module docstring).

    Keys a W&B resume or agent hands back that the program records itself (``job``, ``teacher_names``, ...)
    are ignored with one line naming them (``notes``); any other unknown flag is refused.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage(cls))
        raise SystemExit(0)
    known = {f.name: f for f in fields(cls)}
    pairs, ignored, positional = _split(argv, known)
    slots = [f for f in known.values() if f.metadata.get("positional")]
    if len(positional) > len(slots):
        extra = positional[len(slots)]
        raise KDError(f"unexpected argument {extra!r}: settings are written --key=value (see --help)")
    pairs = [(f.name, raw) for f, raw in zip(slots, positional)] + pairs
    faults.check()
    given: dict[str, str] = {}
    for key, raw in pairs:
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:80]
            raise KDError(f"--{key}={shown!r} holds bytes that are not UTF-8 text: pass it in UTF-8 (e.g. a path "
                          "of letters, digits, . _ -)") from None
        if key in given:
            raise KDError(f"--{key} is given twice ({given[key]!r} and {raw!r}): give it once")
        given[key] = raw
    missing = [f.name for f in known.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in given]
    if missing:
        how = missing[0].upper() if known[missing[0]].metadata.get("positional") else f"--{missing[0]}=..."
        raise KDError(f"{how} is required: see --help")
    if ignored and notes:
        print(f"note: ignoring keys W&B passed back that the program records itself: "
              f"{', '.join(sorted(set(ignored)))}", file=sys.stderr)
    cfg = cls(**{k: _convert(known[k], raw, k) for k, raw in given.items()})
    cfg.validate() if hasattr(cfg, "validate") else check_fields(cfg)
    return cfg


def usage(cls) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    lines = [f"{doc}", "settings (--key=value; booleans True/False, or --key alone for True):"]
    for f in fields(cls):
        m = f.metadata
        rule = allowed(f)
        kind = "one of " if m.get("choices") else "range " if rule and not m.get("name") else ""
        rule = f"; {kind}{rule}" if rule else ""
        if m.get("positional"):
            head = f"  {f.name.upper()}"
        elif f.default is dataclasses.MISSING:
            head = f"  --{f.name}=... (required)"
        else:
            head = f"  --{f.name}={f.default if f.default != '' else chr(34) * 2}"
        also = f" (also --{', --'.join(m['switches'])})" if m.get("switches") else ""
        lines.append(head.ljust(34) + f"  {m.get('help', '')}{rule}{also}")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def env_seconds(name: str, default: float, lo: float, hi: float, what: str) -> float:
    """The environment setting ``name`` as seconds from ``lo`` to ``hi`` (``default`` when unset); anything else is
    one KDError naming the range, what the setting is for (``what``) and the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise KDError(f"{name}={raw!r} must be a number of seconds from {lo:g} to {hi:g} ({what}): unset it for "
                      f"{default:.0f}")
    return value
