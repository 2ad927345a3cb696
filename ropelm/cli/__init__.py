"""``ropelm-exp``: the command-line interface (entry point ``ropelm.cli:main``).

The click group and the options commands share live in ``app.py``; each other
module holds the command it is named after and registers it on the group when
imported. Every command builds at most one plugin registry and passes it down.
"""

from ropelm.cli import (  # noqa: F401 (imported to register their commands)
    bench,
    check,
    compare,
    device_check,
    eval,
    export,
    extend,
    generate,
    plugins,
    prepare,
    run,
    sweep,
    tokenizer,
    train,
    validate,
)
from ropelm.cli.app import main

__all__ = ["main"]
