"""``ropelm-exp export --format hf``: a trained model as a Hugging Face transformers directory.

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``, without custom code::

    DIR/
      config.json             GPTNeoXForCausalLM or GPT2LMHeadModel, plus "ropelm": the ModelConfig
      generation_config.json  end-of-text (bos/eos) and padding token ids
      model.safetensors       the weights in transformers' layout (see ropelm.hf_convert)
      tokenizer.json          the run's tokenizer as a fast tokenizer, with
      tokenizer_config.json   its end-of-text and padding tokens declared
      README.md               a model card: configuration, data, tokens seen, validation ppl

RoPE-SM and RoPE-SM-complex (any RoPE scaling) become ``GPTNeoXForCausalLM``, Learned-APE
``GPT2LMHeadModel``; every other variant, and options those architectures lack (grouped-query
attention, a logit soft-cap, a trained LM-head bias), is refused with one sentence before
anything is written. The directory is assembled under a temporary sibling name and renamed
into place, so ``--out`` is afterwards either the complete export or what it was before.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

import ropelm
from ropelm.atomic import fsync_dir, fsync_file, json_text, storage_error
from ropelm.checkpoint import (
    TOKENIZER,
    load_model,
    read_model_config,
    resolve_checkpoint,
    verify_checkpoint,
)
from ropelm.config import ModelConfig
from ropelm.errors import CheckpointError, ConfigError
from ropelm.hf_convert import (
    ARCHITECTURE_OF,
    GPT2,
    LAYER_NORM_EPS,
    NEOX,
    rope_parameters,
    to_hf_state,
)
from ropelm.hf_import import HF_CONFIG, HF_WEIGHTS, is_hf_dir, read_hf_model
from ropelm.model import TransformerLM
from ropelm.registry import Registry
from ropelm.runs import RunDir
from ropelm.tokenizer import EOT, PAD, tokenizer_info

EXPORTABLE = (
    "RoPE-SM and RoPE-SM-complex (as GPTNeoXForCausalLM) and Learned-APE (as GPT2LMHeadModel)"
)


@dataclass(frozen=True)
class Export:
    """What :func:`export_hf` wrote."""

    path: Path
    architecture: str
    att_type: str
    n_params: int
    source: Path  # the checkpoint (or transformers) directory exported


def export_hf(
    source: str | Path, out: str | Path, *, which: str = "best", force: bool = False
) -> Export:
    """Export the ``which`` checkpoint of run ``source`` (or a checkpoint or transformers
    directory) as a transformers model directory ``out``.

    Raises:
        ConfigError: a variant or option without a transformers architecture, or ``out``
            exists (without ``force``, or it is not a previous export).
        CheckpointError: no such checkpoint (e.g. a run still before its first evaluation).
        StorageError: the directory could not be written; nothing was changed.
    """
    source, out = Path(source), Path(out)
    check_target(out, force)
    require_transformers()
    directory = resolve_checkpoint(source, which)
    _check_not_inside(out, directory)
    if is_hf_dir(directory):
        config, _ = read_hf_model(directory)
    else:
        verify_checkpoint(directory)
        config, _ = read_model_config(directory)
    architecture = check_exportable(config)  # before any plugin code or weights load
    model = load_model(directory, Registry.default(), verify=False)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    head_bias = state.get("lm_head.bias")
    if head_bias is not None and bool(head_bias.any()):
        raise ConfigError(
            f"The model in {directory} was trained with model.bias: true, so its LM head has a "
            f"bias, which {NEOX} and {GPT2} lack; only runs trained with model.bias: false "
            "export exactly."
        )
    if not (directory / TOKENIZER).is_file():
        raise CheckpointError(
            f"{directory} holds no {TOKENIZER}, so there is no tokenizer to export."
        )
    tokens = tokenizer_info(directory / TOKENIZER)
    card = model_card(source, directory, model, architecture)
    files = {
        HF_CONFIG: hf_config(model, architecture, tokens.eot_id, tokens.pad_id),
        "generation_config.json": {"bos_token_id": tokens.eot_id, "eos_token_id": tokens.eot_id,
                                   "pad_token_id": tokens.pad_id},
    }  # fmt: skip
    weights = to_hf_state(state, model.config, architecture)
    _write_directory(out, files, weights, directory / TOKENIZER, model.config.block_size, card)
    return Export(out, architecture, config.att_type, model.num_parameters(), directory)


def check_target(out: Path, force: bool) -> None:
    """Refuse an ``out`` that exists, unless ``force`` and it is a previous export."""
    if not out.exists():
        return
    if not force:
        raise ConfigError(
            f"{out} already exists; pass --force to replace it, or choose another --out."
        )
    if not out.is_dir() or (any(out.iterdir()) and not is_hf_dir(out)):
        raise ConfigError(
            f"{out} exists and is not a Hugging Face model directory, and --force replaces only "
            "a previous export; choose another --out."
        )


def _check_not_inside(out: Path, directory: Path) -> None:
    out, directory = out.resolve(), directory.resolve()
    if out == directory or out in directory.parents:
        raise ConfigError(f"{out} holds the checkpoint being exported; choose another --out.")


def check_exportable(config: ModelConfig) -> str:
    """The transformers architecture of a model with ``config``, or one sentence saying why none."""
    architecture = ARCHITECTURE_OF.get(config.att_type)
    if architecture is None:
        raise ConfigError(
            f"Attention '{config.att_type}' has no matching transformers architecture; "
            f"ropelm exports {EXPORTABLE}."
        )
    n_kv_head = config.att_options.get("n_kv_head")
    if n_kv_head not in (None, config.n_head):
        raise ConfigError(
            f"The model uses grouped-query attention (n_kv_head: {n_kv_head}), which "
            f"{architecture} lacks; ropelm exports {EXPORTABLE}, with one key/value head per "
            "query head."
        )
    if config.att_options.get("softcap") is not None:
        raise ConfigError(
            f"The model soft-caps its attention logits (softcap), which {architecture} does not; "
            f"ropelm exports {EXPORTABLE}, without softcap."
        )
    return architecture


def hf_config(model: TransformerLM, architecture: str, eot_id: int, pad_id: int) -> dict[str, Any]:
    """``config.json`` of ``model`` as ``architecture`` (keys of transformers 4 and 5)."""
    c = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    common = {
        "vocab_size": c.vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "pad_token_id": pad_id, "tie_word_embeddings": False, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype,
        "ropelm": {"version": ropelm.__version__, "model": c.model_dump(mode="json")},
    }  # fmt: skip
    if architecture == GPT2:
        return {
            "architectures": [GPT2], "model_type": "gpt2", "n_embd": c.n_embd,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_positions": c.block_size,
            "n_inner": 4 * c.n_embd, "activation_function": "gelu",
            "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        } | common  # fmt: skip
    params, max_positions = rope_parameters(c, model.attention.options)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {
        "architectures": [NEOX], "model_type": "gpt_neox", "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "intermediate_size": 4 * c.n_embd, "hidden_act": "gelu",
        "use_parallel_residual": False, "layer_norm_eps": LAYER_NORM_EPS,
        "attention_bias": c.bias, "hidden_dropout": c.dropout, "attention_dropout": c.dropout,
        "max_position_embeddings": max_positions, "rotary_pct": 1.0,
        "rotary_emb_base": params["rope_theta"], "rope_parameters": params,
        # transformers 4's name; transformers 5 reads it first, so it must agree
        "rope_scaling": scaling if scaling["rope_type"] != "default" else None,
    } | common  # fmt: skip


def _write_directory(
    out: Path,
    files: dict[str, dict[str, Any]],
    weights: dict[str, torch.Tensor],
    tokenizer_file: Path,
    block_size: int,
    card: str,
) -> None:
    """Assemble the export in a temporary sibling of ``out``, then rename it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise storage_error(out, err) from None
    try:
        for name, blob in files.items():
            (staging / name).write_text(json_text(blob) + "\n", encoding="utf-8")
        save_file(weights, str(staging / HF_WEIGHTS), metadata={"format": "pt"})
        save_fast_tokenizer(tokenizer_file, staging, block_size)
        (staging / "README.md").write_text(card, encoding="utf-8")
        _make_durable(staging)
        _replace(staging, out)
    except OSError as err:
        raise storage_error(out, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_durable(staging: Path) -> None:
    """The usual permissions (mkdtemp makes 0700, some writers 0600), contents on disk."""
    mask = os.umask(0)
    os.umask(mask)
    for file in staging.iterdir():
        os.chmod(file, 0o666 & ~mask)
        fsync_file(file)
    os.chmod(staging, 0o777 & ~mask)
    fsync_dir(staging)


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; a previous ``out`` is moved aside first, removed last."""
    if not out.exists():
        staging.rename(out)
        fsync_dir(out.parent)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_fast_tokenizer(tokenizer_file: Path, directory: Path, block_size: int) -> None:
    """Write ``tokenizer_file`` as a transformers fast tokenizer with its special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(tokenizer_file)),
        bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
        model_max_length=block_size, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.save_pretrained(str(directory))
    # transformers 5 names its class TokenizersBackend, which transformers 4 cannot find; both
    # load "PreTrainedTokenizerFast" (tokenizer.json itself is the same for both)
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings_file.write_text(json_text(settings) + "\n", encoding="utf-8")


def require_transformers() -> None:
    """One sentence when transformers (the ``hf`` extra) is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "Exporting to Hugging Face format needs the transformers package; install it with "
            "pip install 'ropelm[hf]'."
        ) from None


def model_card(source: Path, directory: Path, model: TransformerLM, architecture: str) -> str:
    """The README.md of the export: what was trained, on what, how far, how well."""
    run = _run_facts(source, directory)
    c = model.config
    val_loss = run.get("val_loss")
    ppl = f"{math.exp(val_loss):.2f}" if isinstance(val_loss, int | float) else "n/a"
    rows = [
        ("attention", f"{c.att_type} {json.dumps(c.att_options) if c.att_options else ''}"),
        ("architecture", f"{architecture} (transformers)"),
        ("parameters", f"{model.num_parameters():,}"),
        ("layers / heads / width", f"{c.n_layer} / {c.n_head} / {c.n_embd}"),
        ("context (block_size)", str(c.block_size)),
        ("vocabulary", f"{c.vocab_size:,} (byte-level BPE)"),
        ("checkpoint", f"step {run.get('step', 'n/a')} ({directory.name})"),
        ("tokens seen", f"{run['tokens']:,}" if isinstance(run.get("tokens"), int) else "n/a"),
        ("validation loss", f"{val_loss:.4f}" if isinstance(val_loss, int | float) else "n/a"),
        ("validation perplexity", ppl),
        ("data", run.get("data", "n/a")),
    ]
    table = "\n".join(f"| {key} | {value.strip()} |" for key, value in rows)
    config_yaml = run.get("config") or yaml.safe_dump({"model": c.model_dump(mode="json")})
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [ropelm, {c.att_type.lower()}]
---

# {run.get("name") or directory.name}

A {c.att_type} language model trained with ropelm and exported as `{architecture}`; it
computes the same logits as the ropelm checkpoint (float32).

| | |
| --- | --- |
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
ids = tokenizer("The history of", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```

## Training configuration

```yaml
{config_yaml.rstrip()}
```
"""


def _run_facts(source: Path, directory: Path) -> dict[str, Any]:
    """Name, config, data, step, validation loss and tokens seen of the exported checkpoint."""
    facts: dict[str, Any] = {}
    manifest = directory / "checkpoint.json"
    if manifest.is_file():
        blob = json.loads(manifest.read_text())
        facts.update(step=blob.get("step"), val_loss=blob.get("val_loss"))
    root = next(
        (p for p in (source, directory.parent.parent) if (p / "config.yaml").is_file()), None
    )
    if root is None:
        return facts
    facts["config"] = (root / "config.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(facts["config"]) or {}
    facts["name"] = config.get("name")
    data = config.get("data", {})
    where = data.get("name") if data.get("source") == "hub" else ", ".join(data.get("paths", []))
    facts["data"] = f"{data.get('source')}{f' ({where})' if where else ''}"
    for row in RunDir(root).read_metrics():  # the tokens seen when the checkpoint was saved
        if row.get("step") == facts.get("step") and isinstance(row.get("tokens"), int):
            facts["tokens"] = row["tokens"]
    return facts
