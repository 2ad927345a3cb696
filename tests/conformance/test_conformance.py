"""The conformance suite: every registered attention variant through every check.

``test_variant_conforms`` is parametrized (see conftest.py) over the variants of
``Registry.default()`` and over ``ropelm.testing.CHECKS``; a check that raises
``NotApplicable`` (the variant declares it cannot do that) is a skip.

The rest of the file checks the checks: deliberately broken variants must fail
the check meant to catch them, so a check that silently passes everything
cannot go unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ropelm import AttentionSpec, Capabilities, ModelConfig, Registry, SelfAttention
from ropelm.rope import RotaryEmbedding, apply_rotary_emb
from ropelm.testing import (
    CHECKS,
    NotApplicable,
    check_batch_independence,
    check_bf16_close_to_fp32,
    check_causality,
    check_determinism,
    check_dropout_only_in_train_mode,
    check_gradients_reach_every_parameter,
    check_kv_cache_matches_full_forward,
    check_output_shape_and_dtype,
    check_sequence_lengths,
    run_all,
)


def run_check(check: Callable[[AttentionSpec], None], spec: AttentionSpec) -> None:
    """Run one check; NotApplicable becomes a pytest skip."""
    try:
        check(spec)
    except NotApplicable as err:
        pytest.skip(str(err))


def test_variant_conforms(registry: Registry, variant_name: str, conformance_check) -> None:
    run_check(conformance_check, registry.get(variant_name))


def test_entry_point_variant_conforms(demo_plugin, conformance_check) -> None:
    """The variant of an installed third-party package (entry point) is covered too."""
    registry = Registry.default()
    assert registry.variant(demo_plugin.variant).source == demo_plugin.source
    run_check(conformance_check, registry.get(demo_plugin.variant))


# -- the checks catch broken variants ---------------------------------------------------------


def make_spec(name: str, module: Callable[[ModelConfig], nn.Module], **caps: bool) -> AttentionSpec:
    return AttentionSpec(
        name=name,
        description="deliberately broken variant for testing ropelm.testing",
        reference="https://example.invalid",
        factory=lambda config, options: module(config),
        capabilities=Capabilities(**caps),
    )


class SeesTheFuture(SelfAttention):
    """Bug: attention without the causal mask."""

    def attend(self, q, k, v, start):
        return F.scaled_dot_product_attention(q, k, v)


class IgnoresCacheOffset(SelfAttention):
    """Bug: every call rotates as if it started at position 0 (breaks cached decoding)."""

    def __init__(self, config):
        super().__init__(config, rotation=RotaryEmbedding(config.head_size))

    def position_qk(self, q, k, start):
        return super().position_qk(q, k, 0)


class MixesBatch(SelfAttention):
    """Bug: leaks the batch mean into every element (e.g. a wrong reshape or a norm over B)."""

    def forward(self, x, cache=None):
        y = super().forward(x, cache)
        return y + 0.1 * y.mean(dim=0, keepdim=True)


class UnusedParameter(SelfAttention):
    """Bug: a parameter that never enters the computation."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Parameter(torch.ones(config.n_embd))


class Bf16Angles(SelfAttention):
    """Bug: RoPE angles computed in the input dtype (bf16 loses positions above 256)."""

    def position_qk(self, q, k, start):
        hs = q.size(-1)
        positions = torch.arange(start, start + q.size(2), dtype=q.dtype)
        inv_freq = (10000.0 ** (-torch.arange(0, hs, 2) / hs)).to(q.dtype)
        angles = positions[:, None] * inv_freq  # (T, hs/2) in q's dtype
        cos, sin = angles.cos(), angles.sin()
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


class DropoutInEval(SelfAttention):
    """Bug: output dropout ignores eval mode."""

    def forward(self, x, cache=None):
        return F.dropout(super().forward(x, cache), self.dropout, training=True)


class NoisyForward(SelfAttention):
    """Bug: unseeded noise in the forward pass, even in eval mode."""

    def forward(self, x, cache=None):
        generator = torch.Generator()
        generator.seed()  # a fresh nondeterministic seed, leaving the global RNG alone
        noise = torch.randn(x.shape, generator=generator)
        return super().forward(x, cache) + 1e-3 * noise


class AlwaysFloat32(SelfAttention):
    """Bug: returns float32 whatever the input dtype."""

    def forward(self, x, cache=None):
        return super().forward(x, cache).float()


class SqueezesTime(SelfAttention):
    """Bug: ``squeeze()`` drops the time axis when T = 1."""

    def forward(self, x, cache=None):
        return super().forward(x, cache).squeeze()


BROKEN = [
    (SeesTheFuture, check_causality, r"outputs < 1: max abs diff"),
    (IgnoresCacheOffset, check_kv_cache_matches_full_forward, r"KV cache token by token"),
    (MixesBatch, check_batch_independence, r"batch element 0 vs run alone"),
    (UnusedParameter, check_gradients_reach_every_parameter, r"gate received no gradient"),
    (Bf16Angles, check_bf16_close_to_fp32, r"bf16 relative error"),
    (DropoutInEval, check_dropout_only_in_train_mode, r"eval mode with dropout 0.1"),
    (NoisyForward, check_determinism, r"eval mode: same seed, different logits"),
    (AlwaysFloat32, check_output_shape_and_dtype, r"dtype torch.float32, expected torch.bfloat16"),
    (SqueezesTime, check_sequence_lengths, r"layer at T=1: output shape \(2, 32\)"),
]


@pytest.mark.parametrize(
    ("module", "check", "message"), BROKEN, ids=[module.__name__ for module, _, _ in BROKEN]
)
def test_check_catches_broken_variant(module, check, message) -> None:
    spec = make_spec(f"Broken-{module.__name__}", module)
    with pytest.raises(AssertionError, match=rf"\[Broken-{module.__name__}\] .*{message}"):
        check(spec)


def test_position_bugs_are_specific() -> None:
    """A cache-offset bug fails the KV-cache check only: the other checks stay green."""
    spec = make_spec("Broken-IgnoresCacheOffset", IgnoresCacheOffset)
    for check in (check_causality, check_batch_independence, check_sequence_lengths):
        check(spec)


def test_capabilities_make_checks_not_applicable() -> None:
    spec = make_spec("NoCache-NonCausal", SeesTheFuture, causal=False, kv_cache=False)
    with pytest.raises(NotApplicable, match="kv_cache=False"):
        check_kv_cache_matches_full_forward(spec)
    with pytest.raises(NotApplicable, match="causal=False"):
        check_causality(spec)


CUDA_CHECKS = [
    "check_flex_matches_dense_on_cuda",
    "check_device_bf16_matches_cpu_fp32",
    "check_device_kv_cache_matches_full_forward",
]


def test_run_all_reports_not_applicable_and_passes() -> None:
    spec = make_spec("Plain-NoCache", SelfAttention, kv_cache=False)
    results = {r.check: r for r in run_all(spec)}
    assert list(results) == [check.__name__ for check in CHECKS]
    expected_na = {  # no cache, no document mask declared, no CUDA here (if so)
        "check_kv_cache_matches_full_forward",
        "check_document_mask_isolates_documents",
        *(CUDA_CHECKS if not torch.cuda.is_available() else []),
    }
    assert {n for n, r in results.items() if r.outcome == "not applicable"} == expected_na
    assert {r.outcome for name, r in results.items() if name not in expected_na} == {"passed"}


def test_run_all_lists_every_failure() -> None:
    spec = make_spec("Broken-SeesTheFuture", SeesTheFuture)
    with pytest.raises(AssertionError) as info:
        run_all(spec)
    message = str(info.value)
    assert "conformance checks failed for 'Broken-SeesTheFuture'" in message
    assert "- check_causality:" in message
    assert "- check_kv_cache_matches_full_forward:" in message  # the cache masks nothing either


def test_checks_leave_the_global_rng_alone() -> None:
    spec = make_spec("Plain", SelfAttention)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    check_determinism(spec)
    assert torch.equal(torch.rand(3), expected)
