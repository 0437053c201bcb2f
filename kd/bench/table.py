"""The benchmark's two tables: the detailed one (ours vs reference, ratio, target) and the repository's speed
table (what | measured | what it means), old design beside new where both were measured."""

from __future__ import annotations

TARGETS = {  # (what, minimum ratio)
    "overhead": 0.9, "distill-paper-m3": 1.8, "distill-paper-m12": 4.0, "cache-vs-free-m12": 0.85,
}


def row(what: str, ours: float, ref: float, r: float, target: str | None) -> dict:
    need = TARGETS.get(target) if target else None
    return {"what": what, "ours": f"{ours:.0f} img/s", "ref": f"{ref:.0f} img/s", "ratio": f"{r:.2f}x",
            "target": f">= {need}x" if need else "", "holds": ("yes" if r >= need else "NO") if need else "",
            "value": r, "ours_img_s": ours, "ref_img_s": ref, "key": target, "min": need}


def note(what: str, ours: str, ref: str = "", ratio: str = "", target: str = "") -> dict:
    """A row without a checked ratio (a one-off time, a rate on its own)."""
    return {"what": what, "ours": ours, "ref": ref, "ratio": ratio, "target": target, "holds": ""}


COLUMNS = (("what", 48), ("ours", 14), ("ref", 16), ("ratio", 12), ("target", 18), ("holds", 5))


def fmt(r: dict) -> str:
    return "| " + " | ".join(f"{r[k]:<{w}}" for k, w in COLUMNS) + " |"


def table(rows: list) -> str:
    head = {k: k for k, _ in COLUMNS}
    head.update(ours="ours", ref="reference")
    rule = "|" + "|".join("-" * (w + 2) for _, w in COLUMNS) + "|"
    return "\n".join([fmt(head), rule, *(fmt(r) for r in rows)])


def markdown(header: tuple, rows: list[tuple]) -> str:
    """A GitHub-markdown table (the README's form)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    return markdown(("what", "measured", "what it means"), [(r["what"], r["measured"], r["means"]) for r in rows])
