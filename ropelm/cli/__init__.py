"""``ropelm-exp``: the command-line interface (entry point ``ropelm.cli:main``).

Each module registers its commands on the click group :data:`main` when imported.
"""

from ropelm.cli import (  # noqa: F401 (imported to register their commands)
    compare_commands,
    model_commands,
    pipeline_commands,
    setup_commands,
)
from ropelm.cli.app import main

__all__ = ["main"]
