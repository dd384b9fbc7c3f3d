"""`python -m skyfuse.cli`: the same command as the `skyfuse` script."""
from skyfuse.cli import run

run()
