"""``synthetic_effect.png``: does a better generator (lower FID) help distillation more?

For each synthetic source and ensemble size 1 and 3 (at Figure 1's temperature): the change in mean student
test accuracy and in mean test agreement from real data only (ratio 0) to the largest ratio of that source,
in percentage points, against the generator's FID. Drawn only when the study uses two or more sources; a
source whose FID is unknown is named under the figure instead of drawn.
"""

from __future__ import annotations

from kd import names
from kd.report.aggregate import FIG1_SIZES, Group, fig1_temperature, source_fid, sources

DELTAS = {"d_acc": names.TEST_ACC, "d_agreement": names.TEST_AGREEMENT}
MARKERS = {1: "o", 3: "s"}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def _delta(base: Group, top: Group, metric: str) -> float | None:
    a, b = base.stats[metric]["mean"], top.stats[metric]["mean"]
    return None if a is None or b is None else b - a


def synthetic_effects(groups: list[Group]) -> list[dict]:
    """One row per (source, ensemble size) that has both a real-only and a synthetic group at Figure 1's
    temperature: source, fid, ensemble_size, ratio (the largest), d_acc and d_agreement (fractions)."""
    tau = fig1_temperature(groups)
    rows = []
    for src in sources(groups):
        for m in FIG1_SIZES:
            base = [g for g in groups if g.key == (m, 0.0, tau)]
            own = [g for g in groups if g.synthetic_source == src and g.ensemble_size == m and g.temperature == tau]
            if not base or not own:
                continue
            top = max(own, key=lambda g: g.synthetic_ratio)
            rows.append({"source": src, "fid": source_fid(groups, src), "ensemble_size": m,
                         "ratio": top.synthetic_ratio,
                         **{k: _delta(base[0], top, metric) for k, metric in DELTAS.items()}})
    return rows


def _style(m: int) -> dict:
    """1 teacher: a filled circle; 3: a larger open square (both visible where they coincide)."""
    if m == 1:
        return {"marker": "o", "markersize": 8}
    return {"marker": MARKERS.get(m, "^"), "markersize": 13, "markerfacecolor": "none", "markeredgewidth": 2}


def _draw(axes, rows: list[dict], srcs: list[str]) -> None:
    for ax, (key, what) in zip(axes, (("d_acc", "student test accuracy"), ("d_agreement", "test agreement"))):
        for row in rows:
            if row["fid"] is None or row[key] is None:
                continue
            ax.plot([row["fid"]], [100 * row[key]], linestyle="", color=COLORS[srcs.index(row["source"]) % len(COLORS)],
                    **_style(row["ensemble_size"]))
        ax.axhline(0.0, color="0.5", linewidth=1)
        ax.set_xlabel("generator FID (lower: closer to the real images)")
        ax.set_ylabel(f"change in {what} (percentage points)")
        ax.set_title(f"{what}: largest synthetic ratio minus real only", fontsize=11)
        ax.grid(True, alpha=0.3)


def figure_effect(groups: list[Group], study: str, dataset: str, arch: str):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows, srcs = synthetic_effects(groups), sources(groups)
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    _draw(axes, rows, srcs)
    drawn = {r["source"] for r in rows if r["fid"] is not None}
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], marker="o", linestyle="", label=s)
               for i, s in enumerate(srcs) if s in drawn]
    handles += [Line2D([], [], color="0.3", linestyle="", label=f"{m} teacher{'s' * (m > 1)}", **_style(m))
                for m in MARKERS]
    axes[1].legend(handles=handles, loc="best", fontsize=8.5)
    fig.suptitle("Effect of the synthetic data per generator", fontsize=13)
    unknown = sorted({r["source"] for r in rows if r["fid"] is None})
    tau = fig1_temperature(groups)
    note = f" · not drawn (FID unknown): {', '.join(unknown)}" if unknown else ""
    fig.text(0.5, -0.03, f"study {study} · dataset {dataset} · student {arch} · τ = "
             f"{'-' if tau is None else f'{tau:g}'} · mean over trials{note}",
             ha="center", va="top", fontsize=9, color="0.3")
    return fig
