"""Conformance checks for attention plugins, importable by plugin authors.

Every registered attention variant must pass these checks; ``tests/conformance``
runs them on each variant of :meth:`ropelm.Registry.default`. A plugin author
runs them on their own spec with::

    from ropelm.testing import run_all
    run_all(my_spec)                       # raises AssertionError listing every failure

or one at a time (``check_causality(my_spec)``, ...; see :data:`CHECKS`).

Each check builds a small :class:`ropelm.TransformerLM` and/or a single
attention layer (``spec.factory``) from :func:`conformance_config`, on the CPU in
float32 unless it says otherwise (the flex check and those of
:mod:`ropelm.testing.device_checks` run on CUDA in bf16), raises
:class:`AssertionError` with a message naming the variant and what went
wrong, and raises :class:`NotApplicable` when the variant's declared
:class:`ropelm.Capabilities` rule the check out (no KV cache, not causal) or
the device it needs is missing. Each docstring states the check's tolerance.

Weights: the default initialisation (std 0.02) makes q . k nearly zero, so
attention is almost uniform and a position bug (a wrong offset in the KV cache,
a rotation in the wrong precision) would change outputs by less than the
tolerances. The checks therefore redraw every weight matrix with
std = 1.5 / sqrt(fan_in) (vectors such as biases and LayerNorm weights keep the
values the modules were built with): for RoPE-SM the largest attention weight
of a row is then ~0.5 on average (uniform attention over 32 positions would
give ~0.06) and logits are of order 1-5. Everything is seeded and runs inside
``torch.random.fork_rng``, so the caller's random state is left untouched.
"""

from __future__ import annotations

import dataclasses

from ropelm.attention import AttentionSpec
from ropelm.config import ModelConfig
from ropelm.testing.checks import (
    check_batch_independence,
    check_bf16_close_to_fp32,
    check_causality,
    check_determinism,
    check_dropout_only_in_train_mode,
    check_gradients_reach_every_parameter,
    check_kv_cache_matches_full_forward,
    check_output_shape_and_dtype,
    check_sequence_lengths,
)
from ropelm.testing.device_checks import (
    DEVICE_CHECKS,
    check_device_bf16_matches_cpu_fp32,
    check_device_kv_cache_matches_full_forward,
)
from ropelm.testing.harness import (
    Check,
    NotApplicable,
    build_layer,
    build_model,
    conformance_config,
)
from ropelm.testing.kernel_checks import (
    check_backends_agree,
    check_dense_matches_reference,
    check_document_mask_isolates_documents,
    check_flex_matches_dense_on_cuda,
    naive_attention,
)

__all__ = [
    "CHECKS",
    "DEVICE_CHECKS",
    "CheckResult",
    "NotApplicable",
    "build_layer",
    "build_model",
    "check_backends_agree",
    "check_batch_independence",
    "check_bf16_close_to_fp32",
    "check_causality",
    "check_dense_matches_reference",
    "check_determinism",
    "check_device_bf16_matches_cpu_fp32",
    "check_device_kv_cache_matches_full_forward",
    "check_document_mask_isolates_documents",
    "check_dropout_only_in_train_mode",
    "check_flex_matches_dense_on_cuda",
    "check_gradients_reach_every_parameter",
    "check_kv_cache_matches_full_forward",
    "check_output_shape_and_dtype",
    "check_sequence_lengths",
    "conformance_config",
    "naive_attention",
    "run_all",
    "run_checks",
]


#: Every conformance check, in the order :func:`run_all` runs them.
CHECKS: tuple[Check, ...] = (
    check_output_shape_and_dtype,
    check_causality,
    check_batch_independence,
    check_determinism,
    check_dropout_only_in_train_mode,
    check_gradients_reach_every_parameter,
    check_sequence_lengths,
    check_kv_cache_matches_full_forward,
    check_bf16_close_to_fp32,
    check_document_mask_isolates_documents,
    check_backends_agree,
    check_dense_matches_reference,
    check_flex_matches_dense_on_cuda,
    *DEVICE_CHECKS,
)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``"passed"``, ``"not applicable"`` or ``"failed"``."""

    check: str
    outcome: str
    message: str = ""


def run_all(spec: AttentionSpec, config: ModelConfig | None = None) -> list[CheckResult]:
    """Run every check in :data:`CHECKS` on ``spec``; raise if any failed.

    Returns one :class:`CheckResult` per check when none failed. Otherwise raises
    a single AssertionError listing every failed check with its message (checks
    that do not apply are not failures).
    """
    results = run_checks(spec, config)
    failed = [r for r in results if r.outcome == "failed"]
    if failed:
        lines = "\n".join(f"- {r.check}: {r.message}" for r in failed)
        raise AssertionError(
            f"{len(failed)} of {len(CHECKS)} conformance checks failed for '{spec.name}':\n{lines}"
        )
    return results


def run_checks(spec: AttentionSpec, config: ModelConfig | None = None) -> list[CheckResult]:
    """Every check in :data:`CHECKS` on ``spec``: one :class:`CheckResult` each, never raising.

    ``ropelm-exp check`` prints these as a table.
    """
    results = []
    for check in CHECKS:
        try:
            check(spec, config)
        except NotApplicable as err:
            results.append(CheckResult(check.__name__, "not applicable", str(err)))
        except AssertionError as err:
            results.append(CheckResult(check.__name__, "failed", str(err)))
        except Exception as err:  # a crash is a failure too, reported with its type
            results.append(CheckResult(check.__name__, "failed", f"{type(err).__name__}: {err}"))
        else:
            results.append(CheckResult(check.__name__, "passed"))
    return results
