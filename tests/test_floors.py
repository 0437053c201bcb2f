"""The version floors in pyproject.toml hold: the installed versions satisfy them, and what each floor rests on
(the newest feature the code needs from that package) exists in the installed package.

A floor is the first release with the feature (checked against PyPI's releases): ``wandb leet inspect --json``
and ``--summary`` are in 0.31.0, not 0.30.0; ``wandb.sdk.lib.wbauth`` and ``wandb agent --forward-signals`` in
0.24.0, not 0.23.1; ``wandb_workspaces.expr.And`` in 0.4.0, not 0.3.10; ``subprocess.Popen(process_group=...)``
in Python 3.11.
"""

from __future__ import annotations

import inspect
import platform
import re
import subprocess
import tomllib
from importlib.metadata import version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from kd.wandb_runs import wandb_exe
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def floors() -> dict[str, Version]:
    out = {}
    for requirement in PYPROJECT["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        out[name] = Version(floor)
    return out


def cli_help(*args: str) -> str:
    return subprocess.run([wandb_exe(), *args, "--help"], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def wandb_features() -> None:
    from wandb import wandb_agent
    from wandb.sdk.lib import wbauth

    leet = cli_help("leet", "inspect")
    assert "--json" in leet and "--summary" in leet  # kd.wandb_runs reads offline runs with them
    assert callable(wbauth.read_netrc_auth)  # kd.wandb_runs._logged_in
    assert "--forward-signals" in cli_help("agent")  # make agents, slurm/agents.sbatch
    assert "forward_signals" in inspect.signature(wandb_agent.AgentProcess).parameters


def workspaces_features() -> None:
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    assert expr.And(expr.Metric("ID") == "x") is not None  # kd.report.wandb_report
    for name in ("Report", "Runset", "PanelGrid", "LinePlot", "ScatterPlot", "BarPlot", "MediaBrowser",
                 "MarkdownBlock", "H2", "Layout", "Config", "SummaryMetric"):
        assert hasattr(wr, name), name


def sweeps_features() -> None:
    import sweeps

    for name in ("next_run", "next_runs", "SweepRun", "schema_violations_from_proposed_config"):
        assert hasattr(sweeps, name), name
    assert "n" in inspect.signature(sweeps.next_runs).parameters  # kd.sweep.spec enumerates a grid at once


# the floors this test knows the reason of, each with the check of that reason
CHECKED = {"wandb": (Version("0.31"), wandb_features), "wandb-workspaces": (Version("0.4"), workspaces_features),
           "sweeps": (Version("0.2"), sweeps_features)}


def test_installed_versions_satisfy_every_floor():
    for name, floor in floors().items():
        assert Version(version(name)) >= floor, f"{name} {version(name)} is installed, pyproject needs >={floor}"
    assert Version(platform.python_version()) in SpecifierSet(PYPROJECT["requires-python"])


def test_each_checked_floor_is_the_one_its_feature_needs_and_the_feature_is_there():
    declared = floors()
    for name, (floor, check) in CHECKED.items():
        assert declared[name] == floor, f"pyproject declares {name}>={declared[name]}; its feature needs >={floor}"
        check()


def test_the_python_floor_is_the_launchers():
    assert SpecifierSet(PYPROJECT["requires-python"]) == SpecifierSet(">=3.11")
    assert "process_group" in inspect.signature(subprocess.Popen).parameters  # kd.sweep.launch
