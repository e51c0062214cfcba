import sys

from tickq.cli import run

sys.exit(run())
