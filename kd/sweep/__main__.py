"""``python -m kd.sweep SPEC.yaml ...``: see kd.sweep.cli."""

from kd.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
