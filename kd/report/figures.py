"""The paper's figures, drawn with matplotlib's object API (no pyplot state) and saved atomically.

* Figure 1 (agreement and accuracy vs synthetic data added; panel (a) 1 teacher, (b) 3 teachers) is drawn
  once per synthetic source (the generator of the pool): ``fig1.png`` for the first source in sorted order
  (or the only one), ``fig1-<source slug>.png`` for each other one. Real-only (ratio 0) runs are the common
  starting point of every generator's panel; each panel title names the generator and its FID.
* ``synthetic_effect.png`` (only when the study uses two or more sources; :mod:`kd.report.effect`): per
  source, ensemble size 1 and 3 and synthetic amount, the per-trial paired change in student accuracy and in
  agreement from real only, its mean and 95% t-interval over trials, against the generator's FID; one marker
  per generator family (a training's snapshots and final weights). Without every FID, in categories instead.
* Figure 2: accuracy and agreement vs teacher-ensemble size at ratio 0, one line per temperature.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from kd import names
from kd.io import temp_beside
from kd.report.aggregate import FIG1_SIZES, Group, fig1_temperature, for_source, source_fid, sources, stats, trial_of

# What the shading around a mean line is (python -m kd.report --band=...): the paper's captions give mean ± one
# standard deviation over trials; the range of the trials is the other choice.
BANDS = {"std": "mean ± 1 std over trials", "minmax": "min–max over trials"}
DEFAULT_BAND = "std"


def _lines_note(groups, band: str = DEFAULT_BAND) -> str:
    """What the lines and the shading are, as drawn: a band only where a point has two trials or more."""
    ns = [len(g.runs) for g in groups if g is not None and g.runs]
    if ns and max(ns) > 1:
        return f"lines: mean over trials; shaded: {BANDS[band]}"
    return "one trial per point: lines join single runs (no band)"
ACC, AGREEMENT, TEACHER_ACC = names.TEST_ACC, names.TEST_AGREEMENT, names.TEACHER_ACC


def slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.") or "source"


def fig1_names(groups: list[Group]) -> dict[str | None, str]:
    """Figure 1's file stem per source: 'fig1' for the first (or no) source, 'fig1-<slug>' for the rest."""
    srcs = sources(groups) or [None]
    return {s: "fig1" if i == 0 else f"fig1-{slug(s)}" for i, s in enumerate(srcs)}


def fid_text(fid: float | None) -> str:
    return "FID unknown" if fid is None else f"FID {fid:.1f}"


def x_label(g: Group) -> str:
    """Figure 1's categories: 'real only', '+12.5k' (thousands from 10k up), '+719' (exact below)."""
    if g.synthetic_ratio == 0:
        return "real only"
    n = g.n_synthetic
    if n is None:
        return f"ratio {g.synthetic_ratio:g}"
    if n >= 10_000:
        return f"+{n / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    return f"+{n}"


def _pct(v):
    return math.nan if v is None else 100 * v


def _limits(s: dict, band: str) -> tuple[float, float]:
    """The band's (low, high) of one point's statistics: mean ∓ std, or min and max (NaN for one trial)."""
    if band == "minmax":
        return _pct(s["min"]), _pct(s["max"])
    if s["std"] is None or s["mean"] is None:
        return math.nan, math.nan
    return _pct(s["mean"] - s["std"]), _pct(s["mean"] + s["std"])


def _band(ax, x, groups: list[Group | None], metric: str, color, band: str = DEFAULT_BAND, **kw):
    """Mean line with a band over trials (:data:`BANDS`); a None group (no runs) is skipped (labelled elsewhere)."""
    pts = [(xi, g.stats[metric]) for xi, g in zip(x, groups) if g is not None and g.stats[metric]["n"]]
    x = [xi for xi, _ in pts]
    mean = [_pct(s["mean"]) for _, s in pts]
    lo, hi = ([lim[i] for lim in (_limits(s, band) for _, s in pts)] for i in (0, 1))
    marker = kw.pop("marker", "o")
    if len(pts) == 1 and not marker:  # a lone point of a marker-less line: a short horizontal dash
        marker, kw["markersize"] = "_", 28
    (line,) = ax.plot(x, mean, color=color, marker=marker, **kw)
    if any(s["n"] > 1 for _, s in pts):
        if len(pts) == 1:  # a band needs two points: show the range as an error bar
            ax.errorbar(x, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], color=color, capsize=4,
                        alpha=0.5)
        else:
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    return line


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _trials(groups: list[Group]) -> str:
    ns = sorted({len(g.runs) for g in groups})
    return "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


PROTOCOL_STYLE = {"static": ("-", "o"), "online": (":", "s")}  # Figure 1's line (style, marker) per protocol


def _fig1_panel(ax, series: dict[str, list[Group | None]], ratios: list[float], labels: dict,
                band: str = DEFAULT_BAND) -> None:
    """One panel of Figure 1: agreement (left axis), student and teacher accuracy (right axis); one line of each
    per protocol in ``series`` (static, online), each with its band over trials; the teacher's once."""
    x = list(range(len(ratios)))
    right = ax.twinx()
    for protocol, gs in series.items():
        style, marker = PROTOCOL_STYLE.get(protocol, ("-.", "^"))
        _band(ax, x, gs, AGREEMENT, "tab:blue", band, linestyle=style, marker=marker)
        _band(right, x, gs, ACC, "tab:orange", band, linestyle=style, marker=marker)
    teacher = [next((g for g in col if g is not None), None) for col in zip(*series.values())]
    _band(right, x, teacher, TEACHER_ACC, "0.25", band, linestyle="--", marker="")
    for xi, g in zip(x, teacher):
        if g is None:
            ax.text(xi, 0.03, "no runs", transform=ax.get_xaxis_transform(), ha="center", fontsize=8.5,
                    color="0.35", style="italic")
    ax.set_xticks(x, [labels[r] for r in ratios])
    ax.set_xlim(-0.3, len(ratios) - 0.7)
    ax.set_xlabel("distillation data: real training set + synthetic images")
    ax.set_ylabel("test agreement with teacher (%)", color="tab:blue")
    right.set_ylabel("test accuracy (%)", color="tab:orange")
    ax.tick_params(axis="y", colors="tab:blue")
    right.tick_params(axis="y", colors="tab:orange")
    lo = min(ax.get_ylim()[0], right.get_ylim()[0])  # both axes on one scale: the percentages compare
    hi = max(ax.get_ylim()[1], right.get_ylim()[1])
    ax.set_ylim(lo, hi)
    right.set_ylim(lo, hi)
    ax.grid(True, alpha=0.3)


def _fig1_legend(fig, note: str, protocols: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:blue", marker="o", label="test agreement (left axis)"),
               Line2D([], [], color="tab:orange", marker="o", label="student test accuracy (right axis)"),
               Line2D([], [], color="0.25", linestyle="--", label="teacher test accuracy (right axis)")]
    if len(protocols) > 1:  # the line style says the protocol
        handles += [Line2D([], [], color="0.4", linestyle=PROTOCOL_STYLE.get(p, ("-.", "^"))[0],
                           marker=PROTOCOL_STYLE.get(p, ("-.", "^"))[1], label=f"{p} synthetic data")
                    for p in protocols]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.945), ncol=min(len(handles), 5),
               fontsize=9.5, title=note + " · both axes on one scale", title_fontsize=9, frameon=False)


def figure1(groups: list[Group], study: str, dataset: str, arch: str, source: str | None = None, facet: str = "",
            band: str = DEFAULT_BAND):
    """Figure 1 for one synthetic source (None: every group; a study without synthetic data); ``facet`` names what
    else its runs share where the study varies more (e.g. ``loss kd_nll``); ``band``: :data:`BANDS`."""
    from matplotlib.figure import Figure

    groups = for_source(groups, source)
    tau = fig1_temperature(groups)
    fig = Figure(figsize=(12.5, 6.1 if source else 5.8))  # by hand: a shared legend between title and panels
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.065, right=0.935, top=0.755 if source else 0.79, bottom=0.2, wspace=0.42)
    titles = {1: "(a) Self-distillation: 1 teacher", 3: "(b) Ensemble distillation: 3 teachers"}
    at_tau = [g for g in groups if g.ensemble_size in FIG1_SIZES and g.temperature == tau]
    ratios = sorted({g.synthetic_ratio for g in at_tau})  # the same categories in both panels
    labels = {g.synthetic_ratio: f"{x_label(g)}\n(ratio {g.synthetic_ratio:g})" for g in at_tau}
    protocols = sorted({g.protocol for g in at_tau}, key=lambda p: (p != "static", p))
    drawn = False
    for ax, m in zip(axes, FIG1_SIZES):
        gen = f"\nsynthetic data: {source} · {fid_text(source_fid(groups, source))}" if source else ""
        ax.set_title(titles[m] + gen, fontsize=12)
        by_point = {(g.protocol, g.synthetic_ratio): g for g in at_tau if g.ensemble_size == m}
        if not by_point:
            _empty(ax, f"no finished student runs with ensemble_size={m}" + (f", τ={tau:g}" if tau else ""))
            continue
        series = {p: [by_point.get((p, r)) for r in ratios] for p in protocols}  # None: a gap in the lines
        _fig1_panel(ax, series, ratios, labels, band)
        drawn = True
    fig.suptitle("Fidelity vs generalization as synthetic data is added to distillation", fontsize=13, y=0.99)
    if drawn:
        _fig1_legend(fig, _lines_note(at_tau, band), protocols)
    tau_txt = "-" if tau is None else f"{tau:g}"
    fig.text(0.5, 0.01, f"study {study} · dataset {dataset} · student {arch} · temperature τ = {tau_txt} · "
             + (f"{facet} · " if facet else "")
             + f"trials per point: {_trials(at_tau)} · metrics on the test set after the last epoch",
             ha="center", va="bottom", fontsize=9, color="0.3")
    return fig


def _fig2_lines(ax_acc, ax_agr, at0: list[Group], band: str) -> None:
    colors = ["tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]
    teacher = _teacher_groups(at0)
    _band(ax_acc, [g.ensemble_size for g in teacher], teacher, TEACHER_ACC, "0.25", band, linestyle="--",
          marker="s", label="teacher (ensemble) accuracy")
    for i, t in enumerate(sorted({g.temperature for g in at0})):
        gs = sorted((g for g in at0 if g.temperature == t), key=lambda g: g.ensemble_size)
        c = colors[i % len(colors)]
        xs = [g.ensemble_size for g in gs]
        _band(ax_acc, xs, gs, ACC, c, band, label=f"student, τ = {t:g}")
        _band(ax_agr, xs, gs, AGREEMENT, c, band, label=f"τ = {t:g}")
    for ax, ylabel in ((ax_acc, "test accuracy (%)"), (ax_agr, "test agreement with teacher (%)")):
        ax.set_xticks(sorted({g.ensemble_size for g in at0}))
        ax.set_xlabel("teacher ensemble size m (number of teachers)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9, title=_lines_note(at0, band), title_fontsize=8.5)


def figure2(groups: list[Group], study: str, dataset: str, arch: str, facet: str = "", band: str = DEFAULT_BAND):
    from matplotlib.figure import Figure

    at0 = [g for g in groups if g.synthetic_ratio == 0.0]
    if len({g.protocol for g in at0}) > 1:  # real data only is the same under both protocols: the static runs
        at0 = [g for g in at0 if g.protocol == "static"]
    fig = Figure(figsize=(12.5, 5.0), layout="constrained")
    ax_acc, ax_agr = fig.subplots(1, 2)
    ax_acc.set_title("(a) Teacher and student accuracy vs ensemble size", fontsize=12)
    ax_agr.set_title("(b) Student–teacher agreement vs ensemble size", fontsize=12)
    if not at0:
        for ax in (ax_acc, ax_agr):
            _empty(ax, "no finished student runs with synthetic_ratio=0")
    else:
        _fig2_lines(ax_acc, ax_agr, at0, band)
    fig.suptitle("Does a bigger teacher ensemble give a better or a more faithful student?", fontsize=13)
    fig.text(0.5, -0.02, f"study {study} · dataset {dataset} · student {arch} · real data only "
             f"(synthetic_ratio 0) · {f'{facet} · ' if facet else ''}trials per point: {_trials(at0)} · one line per "
             "distillation temperature τ",
             ha="center", va="top", fontsize=9, color="0.3")
    return fig


def _teacher_groups(at0: list[Group]) -> list[Group]:
    """Teacher accuracy per ensemble size, pooled over temperatures, each teacher ensemble counted once."""
    out = []
    for m in sorted({g.ensemble_size for g in at0}):
        seen: dict[tuple, float] = {}
        for g in at0:
            if g.ensemble_size != m:
                continue
            for r in g.runs:
                v = r.value(TEACHER_ACC)
                if isinstance(v, (int, float)):
                    who = tuple(r.config.get(names.TEACHER_HASHES) or r.config.get(names.TEACHER_NAMES) or
                                [f"trial{trial_of(r)}"])
                    seen[who] = float(v)
        out.append(Group({"ensemble_size": m, "synthetic_ratio": 0.0}, runs=[],
                         stats={TEACHER_ACC: stats(list(seen.values()))}, n_real=None, n_synthetic=None))
    return out


def save_figure(fig, path: Path) -> None:
    """Render to a temp file beside ``path``, renamed over it once complete."""
    with temp_beside(Path(path)) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=Path(path).suffix.lstrip("."))
