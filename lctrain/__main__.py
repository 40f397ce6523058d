"""`python -m lctrain ...` (also what torchrun runs: `torchrun --nproc-per-node N -m lctrain train ...`)."""
import sys

from lctrain.cli import main

sys.exit(main())
