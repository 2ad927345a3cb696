"""The accelerator checks, run on the CPU under bf16 autocast (their code path here).

On a CUDA machine the same checks run in the conformance suite (``device=None``)
and in ``ropelm-exp device-check``; here they get ``device="cpu"`` so every
variant goes through them and broken variants are shown to fail them.
"""

from __future__ import annotations

import pytest
import torch
from test_conformance import Bf16Angles, IgnoresCacheOffset, make_spec

from ropelm import Registry, SelfAttention
from ropelm.testing import (
    DEVICE_CHECKS,
    NotApplicable,
    check_device_bf16_matches_cpu_fp32,
    check_device_kv_cache_matches_full_forward,
)


@pytest.mark.parametrize("check", DEVICE_CHECKS, ids=lambda c: c.__name__)
def test_every_variant_passes_on_the_cpu_path(registry: Registry, check) -> None:
    for name in registry.names():
        try:
            check(registry.get(name), device="cpu")
        except NotApplicable:
            assert not registry.get(name).capabilities.kv_cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("check", DEVICE_CHECKS, ids=lambda c: c.__name__)
def test_without_cuda_the_checks_do_not_apply(check) -> None:
    with pytest.raises(NotApplicable, match="no CUDA device"):
        check(make_spec("Plain", SelfAttention))


def test_bf16_position_terms_fail_the_training_check() -> None:
    """RoPE angles in the autocast dtype lose positions above 256."""
    spec = make_spec("Broken-Bf16Angles", Bf16Angles)
    with pytest.raises(AssertionError, match=r"\[Broken-Bf16Angles\] logits in bf16 on cpu"):
        check_device_bf16_matches_cpu_fp32(spec, device="cpu")


def test_a_cache_offset_bug_fails_the_decoding_check() -> None:
    spec = make_spec("Broken-IgnoresCacheOffset", IgnoresCacheOffset)
    with pytest.raises(AssertionError, match=r"KV-cache decoding in bf16 on cpu: relative error"):
        check_device_kv_cache_matches_full_forward(spec, device="cpu")
