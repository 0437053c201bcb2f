"""``python -m kd.synthetic train|generate``: see :mod:`kd.synthetic.cli`."""

from kd.synthetic.cli import main

main()
