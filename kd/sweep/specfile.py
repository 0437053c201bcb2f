"""Reading a sweep spec file with bounds: its size, its nesting and what its YAML aliases expand to.

A spec is read before anything else looks at it, so a hostile or broken file costs at most a few milliseconds:
over :data:`MAX_BYTES` it is not parsed at all, and YAML anchors and aliases (``&a`` / ``*a``) are allowed
but the document they expand to is counted on PyYAML's node graph (each shared node once) before any Python
object is built. A "billion laughs" file, nested aliases that expand to billions of values, is refused there,
before W&B's sweep engine or ``json.dumps`` would walk the expansion.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kd.errors import KDError

MAX_BYTES = 1 << 20  # a spec is a few hundred bytes; 1 MiB is generous
MAX_NODES = 100_000  # scalars, lists and mappings after alias expansion; a grid of 1,000 values is ~4,000


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand to over MAX_NODES nodes (or loop)."""

    path: Path = Path("spec")

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int | None] = {}
        self._expanded(node, sizes)
        return node

    def _expanded(self, node, sizes: dict) -> int:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise KDError(f"{self.path}: a YAML alias refers to itself: write the values out")
            return sizes[key]
        sizes[key] = None
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        total = 1
        for child in children:
            total += self._expanded(child, sizes)
            if total > MAX_NODES:
                raise KDError(f"{self.path}: its YAML aliases expand to over {MAX_NODES:,} values (an alias "
                              "bomb?): write the values out, without nested anchors")
        sizes[key] = total
        return total


def read_spec_file(path: Path):
    """The parsed YAML of ``path``; every problem is one KDError naming the fix."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise KDError(f"no sweep spec at {path}: pass a YAML file, e.g. sweeps/demo/teachers.yaml") from None
    except IsADirectoryError:
        raise KDError(f"{path} is a folder: pass one spec file, e.g. {path}/teachers.yaml") from None
    except OSError as e:
        raise KDError(f"cannot read the sweep spec {path}: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise KDError(f"{path} is over {MAX_BYTES >> 20} MiB, not a sweep spec: pass the spec's YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KDError(f"{path} is not UTF-8 text, not a sweep spec: pass the spec's YAML file") from None
    loader = BoundedLoader(text)
    loader.path = path
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise KDError(f"{path} is not valid YAML ({problem}{where}): fix the syntax") from None
    except RecursionError:
        raise KDError(f"{path} is nested too deeply for a sweep spec: flatten it") from None
    finally:
        loader.dispose()
