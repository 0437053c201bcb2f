"""``python -m kd.synthetic train|generate|import``: see :mod:`kd.synthetic.cli`."""

from kd.synthetic.cli import main

main()
