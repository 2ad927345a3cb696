"""Built-in attention plugins, installed as ``ropelm.plugins``.

Each module registers its variants through the public hook
``ropelm_register_attention``, exactly as a third-party plugin would.
"""

BUILTIN_MODULES: tuple[str, ...] = (
    "ropelm.plugins.rope_sm",
    "ropelm.plugins.rope_sm_complex",
    "ropelm.plugins.nope",
    "ropelm.plugins.alibi",
    "ropelm.plugins.learned_ape",
    "ropelm.plugins.sinusoidal_ape",
    "ropelm.plugins.rope_linear",
    "ropelm.plugins.rope_sliding",
    "ropelm.plugins.t5_bias",
    "ropelm.plugins.kerple",
)
