"""python -m kd.bench runs every section and writes its JSON (tiny sizes; nothing here asserts a speed)."""

import json
import math

from kd.bench import interleave
from tests.conftest import run_script


def test_interleave_rotates_the_order_every_round():
    seen = []
    out = interleave({k: (lambda k=k: seen.append(k) or 1.0) for k in "abc"}, rounds=3)
    assert seen == list("abc" "bca" "cab") and out == {k: [1.0] * 3 for k in "abc"}


def test_bench_smoke_writes_table_and_json(tmp_path):
    out = run_script("-m kd.bench", "--smoke", "--out=bench/results.json", cwd=tmp_path)
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] and result["smoke"]
    whats = [r["what"] for r in result["rows"]]
    for needle in ("engine vs bare", "teacher training: engine vs paper", "distill m=2: engine (cache) vs paper",
                   "cache vs teachers each step", "cache build m=2", "ensemble m=2", "synthetic ddpm",
                   "synthetic ddim", "synthetic dpm"):
        assert any(needle in w for w in whats), needle
    for r in result["rows"]:
        if "value" in r:
            assert math.isfinite(r["value"]) and r["value"] > 0
    assert result["table"] in out.stdout and "targets:" in out.stdout
    assert not list(tmp_path.glob("runs")) and not list(tmp_path.glob("wandb"))  # nothing left behind
