"""`python -m vaetool` (also what `torchrun -m vaetool` runs)."""

from .cli import run

run()
