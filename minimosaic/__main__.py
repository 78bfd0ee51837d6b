"""`python -m minimosaic ...`: the command line (what `minimosaic train --nproc N` runs under mpiexec)."""
from .cli import main

main()
