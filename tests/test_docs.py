"""The docs say what the code does: every count and size table is the code's own output, every flag the docs name
exists, and every command's --help shows each setting's default once.

* The ``<!-- plan FOLDER -->`` blocks of README.md and docs/reference.md (each study's runs per spec, and its disk
  and memory needs) are exactly what ``python -m kd.sweep.plan`` computes from the specs now (``make docs`` writes
  them); every study folder of sweeps/ has one.
* Every ``--flag`` in README.md, docs/*.md and the sweep specs' comments is a setting of one of the repository's
  commands, or of the outside tool the line runs (wandb, pip, torchrun, sbatch, pytest: :data:`OUTSIDE`).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd.sweep.plan import END, markdown
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags of the outside tools the docs show commands of (each named where it is used)
OUTSIDE = {
    "wandb": {"forward-signals", "count", "host", "relogin", "cancel", "stop", "project", "entity", "json"},
    "pip": {"upgrade", "target", "no-index", "no-deps", "no-compile", "no-cache-dir"},
    "torchrun": {"standalone", "nproc_per_node"},
    "sbatch": {"requeue", "signal", "gres", "partition", "account"},
    "pytest": {"dist"},
    "placeholders": {"key", "flag", "me"},  # "--key=value", "--flag" and "--me" written as examples of a form
}


def settings_classes() -> list:
    from kd.config import DistillConfig, TrainConfig
    from kd.report.cli import ReportSettings
    from kd.sweep.cli import SweepSettings
    from kd.sweep.pack import PackSettings
    from kd.synthetic.config import GenerateConfig, GeneratorTrainConfig
    from kd.synthetic.gnosis import ImportConfig

    return [TrainConfig, DistillConfig, GenerateConfig, GeneratorTrainConfig, ImportConfig, SweepSettings,
            PackSettings, ReportSettings]


def known_flags() -> set[str]:
    known = {f.name for cls in settings_classes() for f in dataclasses.fields(cls)}
    known |= {s for cls in settings_classes() for f in dataclasses.fields(cls) for s in f.metadata.get("switches", ())}
    bench = "".join(p.read_text() for p in sorted((ROOT / "kd" / "bench").glob("*.py")))  # their argparse options
    known |= {m.replace("-", "_") for m in re.findall(r'add_argument\("--([a-z][a-z0-9_-]*)"', bench)}
    return known | {"help"}


def plan_blocks(doc: Path) -> list[tuple[str, str]]:
    text = doc.read_text()
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"<!-- plan (\S+) -->\n(.*?)" + re.escape(END),
                                                                   text, re.S)]


def test_every_plan_block_is_what_the_specs_say_now():
    blocks = [(doc, folder, body) for doc in DOCS for folder, body in plan_blocks(doc)]
    assert blocks, "the docs hold no <!-- plan --> block"
    for doc, folder, body in blocks:
        assert body.strip() == markdown(ROOT / folder).strip(), f"{doc.name}: the plan of {folder} is stale: make docs"
    studies = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "sweeps").glob("*/*.yaml")}
    assert studies <= {folder for _, folder, _ in blocks}, "a study of sweeps/ has no plan block in the docs"


def test_every_flag_the_docs_name_exists():
    outside = set().union(*OUTSIDE.values())
    known = known_flags()
    texts = {p: p.read_text() for p in [*DOCS, *sorted((ROOT / "sweeps").glob("*/*.yaml"))]}
    unknown = {}
    for path, text in texts.items():
        for flag in re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", text):
            if flag.replace("-", "_") not in known and flag not in outside:
                unknown.setdefault(flag, path.name)
    assert not unknown, f"flags the docs name that no command has: {unknown}"


@pytest.mark.parametrize("cmd", [["train.py"], ["distill.py"], ["-m", "kd.sweep"], ["-m", "kd.sweep.pack"],
                                 ["-m", "kd.report"], ["-m", "kd.synthetic", "generate"],
                                 ["-m", "kd.synthetic", "train"], ["-m", "kd.synthetic", "import"]])
def test_every_help_shows_each_setting_and_its_default_once(cmd):
    args = [str(ROOT / cmd[0])] if cmd[0].endswith(".py") else cmd
    out = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and not any(line.count("(default:") > 1 for line in lines), out.stdout
    flags = re.findall(r"^\s+--([a-z_]+)=", out.stdout, re.M)
    assert len(flags) == len(set(flags)) and flags, out.stdout
