"""pluggy hook specifications for ropelm plugins.

A plugin is any module or object with functions marked ``@ropelm.hookimpl``.
Built-in plugins (``ropelm.plugins.*``), third-party packages (entry-point group
``ropelm``) and modules named in an experiment YAML (``plugins:``) all use the
same hooks, so a built-in variant is written exactly like yours.

Example::

    import ropelm

    @ropelm.hookimpl
    def ropelm_register_attention(register):
        register(ropelm.AttentionSpec(name="My-Attn", ...))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ropelm.attention import AttentionSpec

PROJECT_NAME = "ropelm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def ropelm_register_attention(register: Callable[[AttentionSpec], None]) -> None:
    """Register attention variants.

    Call ``register(spec)`` once per variant, with an :class:`ropelm.AttentionSpec`.
    ``spec.name`` is the value users put in ``model.att_type``; it must be unique
    across every installed plugin (a duplicate is reported with both sources).
    The hook is called once, when a :class:`ropelm.Registry` loads the plugin; it
    should only build specs, not allocate tensors or touch the disk.
    """
