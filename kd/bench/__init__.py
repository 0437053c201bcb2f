"""What the study costs on this machine: its steps timed section by section, one JSON, the GPU-hours projected.

    python -m kd.bench --device=cuda                                   # the sweep's own settings, 420 s
    python -m kd.bench --device=cuda --spec=sweeps/cifar10/self_distill.yaml
    python -m kd.bench --smoke                                         # every section on the CPU, tiny sizes

The settings come from the named distill.py spec (the student) and the ``teachers.yaml`` beside it
(:mod:`kd.bench.settings`). Sections run in priority order, so the first minutes hold the decisive numbers:

1. **student**: the student step, fp32 eager, bf16 eager, bf16 compiled and bf16 with CUDA graphs (the compiled
   ones on CUDA, or with ``--compile=True``), with kernels per step and the GPU-busy fraction (torch.profiler)
   on CUDA (:mod:`kd.bench.steps`);
2. **teacher**: the teacher step: the eager variants and the student's fastest;
3. **packs**: k = 1, 4, 8 students as one :class:`kd.fused.FusedPreResNet` step against k plain steps, and a
   row per convolution shape: one grouped convolution against k separate ones (:mod:`kd.bench.packs`);
4. **processes**: k processes per GPU, projected from the GPU-busy fraction (its assumption recorded);
5. **epoch**: one real-size epoch, its evaluation and a checkpoint (:mod:`kd.bench.epoch`);
6. **cache**: a teacher-cache build and its verified load, the full build projected from the rate.

Timing is synchronised with the device (:mod:`kd.bench.timing`: CUDA events on CUDA, ``perf_counter`` after
a synchronise elsewhere) over at least ``--min_s`` seconds a measurement, warm-up untimed. The JSON
(``--out``) is written atomically after every section (and within a section after every measurement), so a
run killed at its limit keeps what it measured. A section that no longer fits ``--budget_s`` (its seconds
estimated from the rates measured before it) is skipped and its reason recorded. Last, the study's GPU-hours
from the measured rates, each row naming the configuration whose rate it uses (:mod:`kd.bench.projection`).
"""


def main(argv=None) -> None:
    from kd.bench.cli import main as run

    run(argv)
