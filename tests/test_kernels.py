"""Choosing a backend, and what each backend does beyond computing the same numbers
(which the conformance suite checks for every variant)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ropelm import ConfigError, ModelConfig, Registry, SelfAttention
from ropelm.dense_attention import QUERY_CHUNK, dense_runs
from ropelm.kernels import ScoreFunctions, choose_backend
from ropelm.masks import sliding_window
from ropelm.model import TransformerLM
from ropelm.testing import naive_attention

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # only device.type is read
PLAIN, BIASED = ScoreFunctions(), ScoreFunctions(score_mod=lambda s, b, h, q, k: s - (q - k))


def choose(requested, functions=BIASED, device=CPU, **call):
    values = dict(dtype=torch.float32, needs_grad=False, dropout_p=0.0, start=0, documents=False)
    return choose_backend(requested, functions, device=device, **{**values, **call})


@pytest.mark.parametrize(
    ("requested", "functions", "device", "call", "expected"),
    [
        ("auto", PLAIN, CPU, {}, "sdpa"),
        ("auto", PLAIN, CPU, {"documents": True}, "dense"),  # a document mask is a mask
        ("auto", BIASED, CPU, {}, "dense"),  # measured faster than flex on the CPU
        ("auto", BIASED, CPU, {"needs_grad": True}, "dense"),
        ("auto", BIASED, GPU, {"needs_grad": True}, "flex"),
        ("auto", BIASED, GPU, {"dropout_p": 0.1}, "dense"),  # flex has no attention dropout
        ("auto", BIASED, GPU, {"start": 7}, "dense"),  # continuing a KV cache
        ("dense", PLAIN, CPU, {}, "dense"),
        ("flex", PLAIN, CPU, {}, "flex"),  # CPU inference
        ("sdpa", PLAIN, GPU, {"needs_grad": True}, "sdpa"),
    ],
)
def test_backend_choice(requested, functions, device, call, expected):
    assert choose(requested, functions, device, **call) == expected


@pytest.mark.parametrize(
    ("requested", "functions", "call", "message"),
    [
        ("sdpa", BIASED, {}, "sdpa runs plain causal attention only"),
        ("sdpa", PLAIN, {"documents": True}, "sdpa runs plain causal attention only"),
        ("flex", BIASED, {"needs_grad": True}, "flex has no backward on the CPU"),
        ("flex", BIASED, {"dropout_p": 0.1}, "flex applies no attention dropout"),
        ("flex", BIASED, {"dtype": torch.float64}, "float32, float16 and bfloat16 on the CPU"),
    ],
)
def test_a_backend_that_cannot_run_names_one_that_can(
    requested, functions, call, message, assert_one_sentence
):
    with pytest.raises(ConfigError, match=message) as info:
        choose(requested, functions, **call)
    assert "dense" in str(info.value)
    assert_one_sentence(str(info.value))


def test_sdpa_for_a_variant_with_a_score_mod_fails_when_the_experiment_is_bound(registry):
    config = ModelConfig(att_type="ALiBi", attention_backend="sdpa")
    with pytest.raises(ConfigError, match="sdpa runs plain causal attention only"):
        registry.resolve(config)


def spans(runs) -> list[tuple[int, int, int, int, int]]:
    return [(r.q_start, r.q_end, r.count, r.kv_start, r.kv_end) for r in runs]


def test_dense_runs_skip_keys_outside_the_mask_and_merge_equal_chunks():
    causal_only = dense_runs(ScoreFunctions(), 2, 0, 300, 300, CPU, chunk=128)
    assert spans(causal_only) == [(0, 128, 1, 0, 128), (128, 256, 1, 0, 256),
                                  (256, 300, 1, 0, 300)]  # fmt: skip
    window = ScoreFunctions(mask_mod=sliding_window(10))
    # chunk 0 sees 0..127; chunks 1-3 each see their 64 queries and the 9 keys before them
    # (one run: one SDPA call over stacked windows); the partial last chunk is its own
    assert spans(dense_runs(window, 2, 0, 300, 300, CPU, chunk=64)) == [
        (0, 64, 1, 0, 64), (64, 256, 3, 55, 256), (256, 300, 1, 247, 300)
    ]  # fmt: skip
    decoding = dense_runs(window, 2, 299, 1, 300, CPU)
    assert spans(decoding) == [(0, 1, 1, 290, 300)]  # a decoding step reads the window only


def layer(registry: Registry, att_type: str, backend: str = "auto", **options) -> SelfAttention:
    torch.manual_seed(0)
    config = ModelConfig(block_size=32, n_layer=1, n_head=4, n_embd=32, vocab_size=64,
                         dropout=0.0, att_type=att_type, att_options=options,
                         attention_backend=backend)  # fmt: skip
    return registry.resolve(config).build_layer(config).eval()


def plan_of(attn: SelfAttention, T: int, dtype: torch.dtype = torch.float32):
    """The runs the layer's dense backend keeps for a no-grad call at length T."""
    dense = attn._dense
    score_mod = attn.score_mod
    params = list(score_mod.parameters()) if isinstance(score_mod, torch.nn.Module) else []
    key = (T, T, 0, CPU, dtype, QUERY_CHUNK, tuple((id(p), p._version) for p in params))
    return dense.plans.get(dense._owner, key)


def test_a_static_bias_is_materialized_once_a_learned_one_every_training_step(registry):
    alibi, t5 = layer(registry, "ALiBi", "dense"), layer(registry, "T5-Bias", "dense")
    x = torch.randn(1, 32, 32)
    with torch.no_grad():
        alibi(x)
        first = plan_of(alibi, 32)
        alibi(x)
        assert first is not None and plan_of(alibi, 32) is first  # same length: reused
    t5.train()
    t5(x).sum().backward()
    assert len(t5._dense.plans) == 0  # needed its gradient: not kept
    with torch.no_grad():
        t5.eval()(x)
        kept = plan_of(t5, 32)
        assert kept is not None
        t5.score_mod.table.add_(1.0)  # an optimizer step changes the table's version
        t5(x)
        assert plan_of(t5, 32) is not None and plan_of(t5, 32) is not kept


@pytest.mark.parametrize(("att_type", "distinct"), [("ALiBi", 1), ("T5-Bias", 3)])
def test_layers_with_equal_masks_and_biases_share_one_copy(registry, att_type, distinct):
    """ALiBi gives every layer the same bias: one plan for the model. T5's tables are
    per layer (random at initialization): one plan per layer, until two are made equal."""
    torch.manual_seed(0)
    config = ModelConfig(block_size=32, n_layer=3, n_head=4, n_embd=32, vocab_size=64,
                         dropout=0.0, att_type=att_type, attention_backend="dense")  # fmt: skip
    model = TransformerLM(config, registry.resolve(config)).eval()
    layers = [block.attn for block in model.blocks]
    assert len({id(attn._dense.plans) for attn in layers}) == 1  # one store for the model
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 32)))
        assert len(layers[0]._dense.plans) == distinct
        if att_type == "T5-Bias":
            for attn in layers[1:]:
                attn.score_mod.table.copy_(layers[0].score_mod.table)
            model(torch.randint(0, 64, (1, 32)))  # new versions: the tables are re-read
            assert len(layers[0]._dense.plans) == 1
        plans = {id(plan_of(attn, 32)) for attn in layers}
        assert len(plans) == 1
        model(torch.randint(0, 64, (2, 20)))  # another length: every layer's plan replaced
        assert len(layers[0]._dense.plans) == 1 and plan_of(layers[0], 32) is None


def test_flex_builds_its_block_mask_once_per_length(registry):
    attn = layer(registry, "RoPE-Sliding", "flex", window=5)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        attn(x)
        masks = dict(attn._flex._block_masks)
        attn(x)
    assert len(masks) == 1 and attn._flex._block_masks == masks


def test_a_variant_flex_cannot_compile_falls_back_to_dense_with_one_warning(registry, monkeypatch):
    def failing_compile(dynamic: bool):
        def flex(*args, **kwargs):  # what a score_mod that does not trace ends in
            raise RuntimeError("Unsupported: data-dependent control flow\n<long compiler trace>")

        return flex

    monkeypatch.setattr("ropelm.kernels.compiled_flex_attention", failing_compile)
    attn = layer(registry, "ALiBi", "flex")
    x = torch.randn(2, 32, 32)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        first, second = attn(x), attn(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "Attention 'ALiBi' does not run under FlexAttention (RuntimeError: Unsupported: "
        "data-dependent control flow); it runs on the dense backend instead."
    ]
    assert attn.last_backend == "dense" and torch.equal(first, second)
    dense = layer(registry, "ALiBi", "dense")
    with torch.no_grad():
        torch.testing.assert_close(first, dense(x), rtol=0, atol=0)


def test_softcap_bounds_the_logits_on_every_backend(registry):
    x = torch.randn(2, 32, 32)
    capped = {b: layer(registry, "NoPE", b, softcap=0.5) for b in ("dense", "flex")}
    for attn in capped.values():
        with torch.no_grad():
            attn.c_attn.weight.mul_(20.0)  # logits far beyond the cap
    with torch.no_grad():
        want = naive_attention(capped["dense"], x)
        for backend, attn in capped.items():
            torch.testing.assert_close(attn(x), want, rtol=0, atol=1e-5)
            assert attn.last_backend == backend
        uncapped = layer(registry, "NoPE")
        uncapped.load_state_dict(capped["dense"].state_dict())
        assert (uncapped(x) - want).abs().max() > 1e-2  # the cap changed the result
