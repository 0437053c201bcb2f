"""``python -m kd.sweep.elastic ARGS``: torch's elastic launcher (``torch.distributed.run ARGS``, what
``accelerate launch`` runs for several GPUs), exiting as its workers did, without its own tracebacks.

torch's launcher reports a failed worker by raising ``ChildFailedError`` (a traceback and a table, after the
worker already printed its one-line error) and a SIGTERM to itself by raising ``SignalException`` (another
traceback), and exits 1 either way. Here:

* a failed worker: the launcher exits with the first failed worker's exit code (2 for a one-line error, 143 for
  a checkpoint after SIGTERM, 130 after SIGINT; 128 + N for a worker killed by signal N), printing one line;
* a stop signal to the launcher (it passes SIGTERM on to its workers, which checkpoint): exit 128 + the signal;
* torch's elastic logging (rendezvous details, "Sending process ... closing signal", the failure it reports
  again) is not shown; each worker gets ``OMP_NUM_THREADS=1`` unless it is set (what torch's launcher sets, with a
  warning, when several workers share a machine).
"""

from __future__ import annotations

import logging
import os
import sys


def worker_exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: a worker killed by signal N (code -N) is 128 + N."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"  # torch's elastic loggers take their level from it when imported
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as elastic_main
    finally:
        os.environ.pop("LOGLEVEL") if level is None else os.environ.update(LOGLEVEL=level)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = worker_exit_code(int(failure.exitcode))
        print(f"kd.sweep.elastic: worker {rank} exited {code} (its own message is above)", file=sys.stderr)
        return code or 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
