"""``python -m kd.bench``: flags, the sections in order under the run's budget, the tables and the JSON."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kd.bench.common import CLASSES, CPU, CUDA, SMOKE, TEMPERATURE, Bench, Clock, machine, machine_line, process_seconds
from kd.bench.table import note, summary_table, table
from kd.errors import ArgumentParser, KDError, cli

SECTIONS = ("train", "distill", "pack", "cache", "ensemble", "synthetic", "compile")
NEED_S = {"train": 20, "distill": 45, "pack": 30, "cache": 15, "ensemble": 8, "synthetic": 25,
          "compile": 45}  # on a GPU


def parse(argv):
    import kd.bench

    p = ArgumentParser(prog="python -m kd.bench", description=kd.bench.__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; 0: torch's default (default: 1 on the CPU, see above)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds per comparison (0: the preset's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student (engine and bare) and, on the CPU, run the compile section")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every section runs, no more")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run, sections that no longer fit are skipped (default: 210 on "
                        "a GPU, none on the CPU; 0: none)")
    return p.parse_args(argv)


def setup(args) -> tuple:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KDError("--device=cuda but torch sees no GPU: run on a GPU machine, or without --device")
    threads = (1 if args.device == "cpu" else 0) if args.threads is None else args.threads
    if threads < 0 or args.rounds < 0 or (args.budget or 0) < 0:
        raise KDError("--threads, --rounds and --budget must be >= 0")
    if threads > 1024:
        raise KDError(f"--threads must be <= 1024, got {threads}: 0 takes torch's default")
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SECTIONS):
        raise KDError(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else CPU if device.type == "cpu" else CUDA
    if args.rounds:
        sizes = replace(sizes, rounds=args.rounds)
    if args.budget is not None:
        sizes = replace(sizes, budget_s=args.budget)
    if device.type == "cpu" and not args.compile:
        skip.add("compile")  # a CPU compiles for minutes: only when asked
    os.environ["WANDB_MODE"] = "disabled"  # the engine runs here only to be timed
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, sizes, skip


def run_sections(b: Bench, skip: set) -> tuple[dict, list]:
    from kd.bench import cachebuild, compiled, packs, sampler, sections

    results: dict = {}
    runs = {"train": ("training", sections.bench_training), "distill": ("distillation", sections.bench_distill),
            "pack": ("packs", packs.bench_packs),
            "cache": ("cache", cachebuild.bench_cache_build), "ensemble": ("ensemble", sections.bench_ensemble),
            "synthetic": ("synthetic", sampler.bench_synthetic),
            "compile": ("compile", lambda b: compiled.bench_compile(b, results.get("packs")))}
    for name in SECTIONS:
        if name in skip:
            continue
        if not b.clock.fits(NEED_S[name]):
            b.skipped.append(name)
            b.add(note(f"{name}: skipped", "over budget", f"{b.clock.elapsed():.0f} s used"))
            continue
        key, fn = runs[name]
        results[key] = fn(b)
    return results, b.skipped


def report(b: Bench, info: dict, results: dict, skipped: list, args) -> dict:
    from kd.bench.projection import projection_notes, projection_table, projection_title
    from kd.bench.summary import TITLE, summarise

    rows = b.rows
    checks = [r for r in rows if r.get("min")]
    print(f"\n{machine_line(info)}; {info['seconds']:.0f} s\n{table(rows)}")
    held = sum(r["holds"] == "yes" for r in checks)
    print(f"targets: {held} of {len(checks)} hold" + "".join(
        f"\n  {r['what']}: {r['ratio']} (target {r['target']})" for r in checks if r["holds"] != "yes"))
    if skipped:
        print("skipped, over the run's budget: " + ", ".join(skipped))
    summary, proj = summarise(results, b.sizes, {**info, "skipped": skipped})
    print(f"\n{TITLE} ({info.get('gpu') or 'CPU ' + info['cpu']}):\n{summary_table(summary)}")
    proj_table = ""
    if proj:
        proj_table = projection_table(proj)
        print(f"\n{projection_title(proj)}:\n{proj_table}\n{projection_notes(proj)}")
    else:
        print("\nno projection: it needs the train, distill, cache and synthetic sections")
    return {"machine": info, "sizes": asdict(b.sizes), "compile": args.compile, "smoke": args.smoke, "rows": rows,
            "targets": {r["what"]: {"ratio": r["value"], "min": r["min"], "holds": r["holds"] == "yes"}
                        for r in checks},
            "results": results, "table": table(rows), "summary": summary, "summary_table": summary_table(summary),
            "projection": proj, "projection_table": proj_table, "skipped": skipped}


def main(argv=None) -> None:
    from kd.io import write_json

    args = parse(argv)
    with cli():
        device, sizes, skip = setup(args)
        info = machine(device)
        print(f"kd.bench on {machine_line(info)}", flush=True)
        print(f"student and teachers {sizes.arch}, 32 px, {CLASSES} classes; teacher batch {sizes.teacher_batch}, "
              f"distillation batch {sizes.distill_batch} (tau {TEMPERATURE:g}); {sizes.rounds} rounds"
              + (f"; budget {sizes.budget_s:.0f} s" if sizes.budget_s else ""), flush=True)
        print(table([]), flush=True)
        clock = Clock(sizes.budget_s)
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            b = Bench(sizes, device, Path(tmp), args.compile, clock, [])
            results, skipped = run_sections(b, skip)
        info["load_avg_end"] = os.getloadavg()[0]
        info["seconds"] = clock.elapsed()
        info["process_seconds"] = process_seconds() or info["seconds"]  # with the imports before the clock
        out = Path(args.out)
        write_json(out, report(b, info, results, skipped, args))
        print(f"wrote {out}")
        sys.stdout.flush()
