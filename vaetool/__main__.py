"""`python -m vaetool` (also what `torchrun -m vaetool` runs)."""

from .cli.app import run

run()
