"""``synthetic_effect.png``: does better sample quality (lower FID) make the synthetic images help more?

For each synthetic source (the generator of a pool; ``MODEL@stepN`` for a snapshot of one training at G step N),
ensemble size 1 and 3 (at Figure 1's temperature) and synthetic amount (every ratio > 0 the source was run at):
per trial, the paired change from real data only (ratio 0, the same ensemble size, temperature and trial) to that
amount, in student test accuracy and in test agreement; then the mean over the trials present in both, with a
95% interval (Student's t with n - 1 degrees of freedom; none for a single trial), against the pool's FID.

A generator *family* is the sources that differ only in ``@stepN`` (the snapshots of one training and its final
weights): one marker shape per family, one colour per synthetic amount, a family's points joined per amount.
Drawn when the study uses two or more sources. When some source's FID is unknown (no Inception weights where its
pool was made) the sources stand side by side in categories (family, then step) instead of on an FID axis, and
the figure says so: the effect is still shown, only not against sample quality.
"""

from __future__ import annotations

import math
import re
import statistics

from kd import names
from kd.report.aggregate import FIG1_SIZES, Group, fig1_temperature, source_fid, trial_of

DELTAS = {"d_acc": names.TEST_ACC, "d_agreement": names.TEST_AGREEMENT}
WHAT = {"d_acc": "student test accuracy", "d_agreement": "test agreement"}
STEP_MARK = names.STEP_MARK
FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEVEL = 0.95
ONLINE_MARK = " (online)"  # an online source's category: its family and protocol


def _snapshot(source: str) -> tuple[str, str, int] | None:
    """(family, unit, position) of a snapshot source: ``generator-cifar100-sngan@step10000`` is step 10000 of
    ``generator-cifar100-sngan``; the authors' imported ``generator-cifar100-gnosis-e300`` is epoch 300 of
    ``generator-cifar100-gnosis`` (``-bilinear`` stays in the family's name); None for any other source."""
    base, mark, step = source.rpartition(STEP_MARK)
    if mark and step.isdigit():
        return base, "step", int(step)
    match = re.fullmatch(r"(.*-gnosis)-e(\d+)(-bilinear)?", source)
    if match:
        return match[1] + (match[3] or ""), "epoch", int(match[2])
    return None


def family_of(source: str) -> str:
    """The generator family of a source: ``generator-cifar100-sngan@step10000`` -> ``generator-cifar100-sngan``,
    ``generator-cifar100-gnosis-e300`` -> ``generator-cifar100-gnosis``."""
    snap = _snapshot(source)
    return source if snap is None else snap[0]


def step_of(source: str) -> int | None:
    """The position of a snapshot source in its training (G step, or the authors' epoch), None for a final (or
    any other) generator."""
    snap = _snapshot(source)
    return None if snap is None else snap[2]


def snapshot_label(source: str) -> str:
    """``step 10000``, ``epoch 300``, or ``final``."""
    snap = _snapshot(source)
    return "final" if snap is None else f"{snap[1]} {snap[2]}"


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the mean of ``values`` and its ``level`` Student-t interval over them (n - 1 degrees
    of freedom); (mean, None, None) for one value, all None for none. A NaN propagates."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None, None
    from scipy.stats import t  # scipy: a dependency of scikit-learn and torch-fidelity

    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_changes(base: Group, top: Group, metric: str) -> dict[int, float]:
    """trial -> ``top``'s value minus ``base``'s value of the same trial, for the trials both hold."""
    def by_trial(g: Group) -> dict[int, float]:
        return {trial_of(r): float(v) for r in g.runs
                if isinstance(v := r.value(metric), (int, float)) and not isinstance(v, bool)}

    a, b = by_trial(base), by_trial(top)
    return {t: b[t] - a[t] for t in sorted(a.keys() & b.keys())}


def synthetic_effects(groups: list[Group]) -> list[dict]:
    """One row per (source, ensemble size, ratio > 0) that has a real-only group of the same ensemble size at
    Figure 1's temperature (``groups``: those of one facet, :func:`kd.report.aggregate.facets`): source, family,
    step, fid, ensemble_size, ratio, n_synthetic, and per change (d_acc, d_agreement, as fractions): the mean over
    the paired trials, ``{key}_lo`` / ``{key}_hi`` (the 95% t-interval, None for one trial), ``{key}_n`` (paired
    trials) and ``{key}_trials`` (trial -> change)."""
    tau = fig1_temperature(groups)
    rows = []
    pairs = sorted({(g.synthetic_source, g.protocol) for g in groups if g.synthetic_source is not None})
    for src, protocol in pairs:
        for m in FIG1_SIZES:
            base = [g for g in groups if (g.ensemble_size, g.synthetic_ratio, g.temperature) == (m, 0.0, tau)]
            base.sort(key=lambda g: g.protocol != protocol)  # real only of the same protocol first (they are equal)
            own = [g for g in groups if g.synthetic_source == src and g.ensemble_size == m and g.temperature == tau
                   and g.synthetic_ratio > 0 and g.protocol == protocol]
            if not base:
                continue
            for top in sorted(own, key=lambda g: g.synthetic_ratio):
                row = {"source": src, "protocol": protocol, "family": family_of(src) + ONLINE_MARK * (
                       protocol == "online"), "step": step_of(src), "fid": source_fid(groups, src),
                       "fid_authors": source_fid(groups, src, authors=True), "ensemble_size": m,
                       "ratio": top.synthetic_ratio, "n_synthetic": top.n_synthetic}
                for key, metric in DELTAS.items():
                    changes = paired_changes(base[0], top, metric)
                    mean, lo, hi = t_interval(list(changes.values()))
                    row.update({key: mean, f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_n": len(changes),
                                f"{key}_trials": changes})
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ drawing
def category(row: dict) -> tuple[str, str]:
    """An effect row's category: (source, protocol)."""
    return row["source"], row.get("protocol", "static")


def _order(rows: list[dict]) -> list[tuple[str, str]]:
    """Categories by family, then protocol (static first), then step (a family's final generator last)."""
    return sorted({category(r) for r in rows}, key=lambda c: (family_of(c[0]), c[1] != "static", c[1],
                                                             step_of(c[0]) is None, step_of(c[0]) or 0))


def _amount(row: dict) -> str:
    n = row["n_synthetic"]
    return f"ratio {row['ratio']:g}" + (f" (+{n:,} images)" if n else "")


def _tick(cat: tuple[str, str], fid: str, several: bool) -> str:
    """A category's label: the family, the snapshot where the family has several sources, the protocol where it
    is online, the FIDs known."""
    src, protocol = cat
    at = snapshot_label(src) if several else ""
    how = "online" if protocol == "online" else ""
    return "\n".join(filter(None, (family_of(src), at, how, fid or "FID unknown")))


def _panel(ax, rows: list[dict], key: str, x_of, dodge: float, families: list[str], ratios: list[float],
           colors, label_steps: bool) -> None:
    """One panel: per amount (colour, shifted sideways by ``dodge`` x-units per amount so the intervals do not
    overlap) and family (marker), the mean changes with their intervals, joined along the family; with
    ``label_steps`` each point of a family of several is labelled with its G step."""
    for i, ratio in enumerate(ratios):
        shift = (i - (len(ratios) - 1) / 2) * dodge
        color = colors[i]
        for fam in families:
            pts = sorted(((x_of(r), r) for r in rows if r["ratio"] == ratio and r["family"] == fam
                          and r[key] is not None and x_of(r) is not None), key=lambda p: p[0])
            if not pts:
                continue
            marker = FAMILY_MARKERS[families.index(fam) % len(FAMILY_MARKERS)]
            xs, ys = [p[0] + shift for p in pts], [100 * p[1][key] for p in pts]
            if len(pts) > 1:
                ax.plot(xs, ys, color=color, linewidth=1, alpha=0.5)
            for x, y, (_, r) in zip(xs, ys, pts):
                lo, hi = r[f"{key}_lo"], r[f"{key}_hi"]
                err = None if lo is None or hi is None else [[y - 100 * lo], [100 * hi - y]]
                ax.errorbar([x], [y], yerr=err, color=color, marker=marker, markersize=8, capsize=3, linestyle="")
                if label_steps and len(pts) > 1 and i == len(ratios) - 1:
                    ax.annotate(snapshot_label(r["source"]), (x, y), xytext=(6, 6),
                                textcoords="offset points", fontsize=7, color="0.3")
    ax.axhline(0.0, color="0.5", linewidth=1)
    ax.grid(True, alpha=0.3)


FID_AXES = {"standard": "generator FID (standard Inception, against the training images; lower: closer to the "
                        "real images)",
            "authors": "generator FID by the authors' own measure (5k samples, torchvision Inception; lower: closer "
                       "to the real images; not comparable to the standard FID)"}


def _fid_axis(srcs: list[str], fids: dict, authors: dict) -> str | None:
    """Which FID the x axis shows: the standard one when every source has it, else the authors' own measure when
    every source has that (the authors' imported snapshots), else None (categories)."""
    if srcs and all(fids[s] is not None for s in srcs):
        return "standard"
    if srcs and all(authors[s] is not None for s in srcs):
        return "authors"
    return None


def _fids_text(fid: float | None, authors: float | None) -> str:
    parts = ([] if fid is None else [f"FID {fid:.1f}"]) + ([] if authors is None else [f"authors' FID {authors:.1f}"])
    return "\n".join(parts)


def figure_effect(groups: list[Group], study: str, dataset: str, arch: str):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = synthetic_effects(groups)
    sizes = sorted({r["ensemble_size"] for r in rows}) or list(FIG1_SIZES[:1])
    cats = _order(rows)
    srcs = sorted({c[0] for c in cats})
    families = sorted({r["family"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows})
    cmap = colormaps["viridis"]
    colors = [cmap(0.1 + 0.75 * i / max(1, len(ratios) - 1)) for i in range(len(ratios))]
    fids = {s: source_fid(groups, s) for s in srcs}
    authors = {s: source_fid(groups, s, authors=True) for s in srcs}
    axis = _fid_axis(srcs, fids, authors)
    on_fid = axis is not None
    fid_key = "fid_authors" if axis == "authors" else "fid"
    chosen = authors if axis == "authors" else fids
    position = {c: i for i, c in enumerate(cats)}

    def x_of(r: dict):
        return r[fid_key] if on_fid else position[category(r)]

    if on_fid:
        span = max(chosen.values()) - min(chosen.values())
        dodge = 0.012 * (span or max(1.0, abs(max(chosen.values()))))
    else:
        dodge = 0.6 / max(2, len(ratios))

    fig = Figure(figsize=(12.0, 1.2 + 4.0 * len(sizes)), layout="constrained")
    axes = fig.subplots(len(sizes), 2, squeeze=False)
    for row_axes, m in zip(axes, sizes):
        mine = [r for r in rows if r["ensemble_size"] == m]
        for ax, key in zip(row_axes, DELTAS):
            _panel(ax, mine, key, x_of, dodge, families, ratios, colors, label_steps=on_fid)
            ax.set_ylabel(f"change in {WHAT[key]}\n(percentage points)")
            ax.set_title(f"{WHAT[key]}, {m} teacher{'s' * (m > 1)}: synthetic minus real only", fontsize=11)
            if on_fid:
                ax.set_xlabel(FID_AXES[axis])
            else:
                size = {f: sum(family_of(s) == f for s in srcs) for f in {family_of(s) for s in srcs}}
                ax.set_xticks(range(len(cats)), [_tick(c, _fids_text(fids[c[0]], authors[c[0]]),
                                                       size[family_of(c[0])] > 1) for c in cats],
                              fontsize=7)
                ax.set_xlim(-0.6, len(cats) - 0.4)
    handles = [Line2D([], [], color="0.3", marker=FAMILY_MARKERS[i % len(FAMILY_MARKERS)], linestyle="",
                      markersize=8, label=f) for i, f in enumerate(families)]
    amounts = {r["ratio"]: _amount(r) for r in rows}
    handles += [Line2D([], [], color=colors[i], marker="s", linestyle="", markersize=8, label=amounts[ratio])
                for i, ratio in enumerate(ratios)]
    axes[0][1].legend(handles=handles, loc="best", fontsize=8)
    fig.suptitle("Effect of the synthetic data against the generator's sample quality", fontsize=13)
    trials = sorted({r[f"{k}_n"] for r in rows for k in DELTAS})
    unknown = [s for s in srcs if fids[s] is None and authors[s] is None]
    tau = fig1_temperature(groups)
    if on_fid:
        note = f" · x: {FID_AXES[axis]} · labels: the snapshot of a training"
    else:
        which = "every source" if len(unknown) == len(srcs) else ", ".join(unknown) or "some sources"
        note = f" · no one FID known for {which}: sources in categories, not on an FID axis"
    fig.text(0.5, -0.01, f"study {study} · dataset {dataset} · student {arch} · τ = "
             f"{'-' if tau is None else f'{tau:g}'} · per trial: synthetic minus real only of the same trial; "
             f"mean and 95% t-interval over n = {'/'.join(map(str, trials)) or '0'} paired trials{note}",
             ha="center", va="top", fontsize=8.5, color="0.3", wrap=True)
    return fig
