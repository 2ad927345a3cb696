"""``python -m ropelm.cli`` (and ``torchrun -m ropelm.cli``) runs ``ropelm-exp``."""

from ropelm.cli import main

main()
