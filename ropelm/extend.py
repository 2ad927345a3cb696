"""Context extension: continue a trained run at a longer block size with a RoPE scaling.

``ropelm-exp extend RUN_DIR --block-size 4x --scaling yarn`` starts a new run from
the parent's best checkpoint. Its configuration is the parent's with

* ``model.block_size`` raised (``4x`` = four times the parent's, or a number of tokens);
* the scaling written into ``model.att_options`` (``scaling``, ``scale_factor``,
  and ``original_max_position_embeddings`` = the parent's block size for the
  methods that read it), so evaluation, generation and export see the extended
  model as it was trained;
* ``train.max_steps`` set to the fine-tuning budget (``--steps``);
* ``init.from_run`` naming the parent and ``init.method`` the method, so the new
  run records where its weights came from.

The tokenizer is the parent's (:func:`ropelm.pipeline.inherited_tokenizer`), and so
are the token files unless ``--set data....`` names other documents, which are then
tokenized with the parent's tokenizer (to fine-tune on long documents, as the papers
do). The methods (:data:`EXTENSION_METHODS`) are those of
:mod:`ropelm.rope_scaling`; ``none`` only lengthens the block (the one method
for variants without RoPE, such as ALiBi or NoPE). Chen et al. (2023,
https://arxiv.org/abs/2306.15595) and Peng et al. (2023,
https://arxiv.org/abs/2309.00071) fine-tune this way for a few hundred steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropelm.config import ExperimentConfig, apply_overrides, validate
from ropelm.errors import ConfigError
from ropelm.rope_scaling import OPTION_APPLIES_TO, SCALING_KINDS

EXTENSION_METHODS: tuple[str, ...] = SCALING_KINDS  # none, linear, ntk, dynamic, yarn, ...
DEFAULT_STEPS = 100


@dataclass(frozen=True)
class ExtensionMethod:
    """A scaling and its options, written ``METHOD[:KEY=VALUE...]``, e.g. ``abf:new_base=5e5``."""

    scaling: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``yarn``, ``abf-new_base500000``: safe in a directory name."""
        extra = "".join(f"-{key}{value}" for key, value in self.options)
        return re.sub(r"[^A-Za-z0-9._-]+", "", f"{self.scaling}{extra}")

    @classmethod
    def parse(cls, text: str) -> ExtensionMethod:
        """``"yarn"`` or ``"abf:new_base=500000"``; an unknown method is one sentence."""
        from ropelm.variants import parse_key_value

        name, *items = [part.strip() for part in text.split(":")]
        if name not in EXTENSION_METHODS:
            raise ConfigError(
                f"Unknown extension method '{name}'; choose one of {', '.join(EXTENSION_METHODS)}."
            )
        options = tuple(
            parse_key_value(item, error=f"'{text}': write method options as METHOD:KEY=VALUE.")
            for item in items
        )
        return cls(name, options)


def parse_methods(items: Iterable[str]) -> list[ExtensionMethod]:
    """``["none,yarn", "abf:new_base=5e5"]`` -> the methods, in order, without repeats."""
    from ropelm.perplexity import split_specs

    methods: list[ExtensionMethod] = []
    for item in split_specs(list(items)):
        method = ExtensionMethod.parse(item)
        if method not in methods:
            methods.append(method)
    return methods


def parse_block_size(text: str, parent_block_size: int) -> int:
    """``"4x"`` -> 4 x the parent's block size; ``"512"`` -> 512; it must exceed the parent's."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(x?)\s*", str(text))
    if match is None:
        raise ConfigError(
            f"--block-size '{text}' is neither a multiple like 4x nor a number of tokens like 512."
        )
    value = float(match.group(1))
    size = value * parent_block_size if match.group(2) else value
    if size != int(size):
        raise ConfigError(f"--block-size {text} is not a whole number of tokens ({size}).")
    if int(size) <= parent_block_size:
        raise ConfigError(
            f"--block-size {text} ({int(size)} tokens) is not above the run's block size "
            f"({parent_block_size}); an extension needs a longer context."
        )
    return int(size)


def scaled_options(
    att_options: Mapping[str, Any],
    method: ExtensionMethod,
    parent_block_size: int,
    block_size: int,
    scale_factor: float | None,
) -> dict[str, Any]:
    """``att_options`` with ``method`` written in; ``scale_factor`` None means new / old length."""
    options = {key: value for key, value in att_options.items() if key not in _SCALING_KEYS}
    if method.scaling == "none":
        return options | dict(method.options)
    options["scaling"] = method.scaling
    if method.scaling != "abf":
        factor = block_size / parent_block_size if scale_factor is None else scale_factor
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ConfigError(f"--scale-factor {factor} is below 1; a factor stretches, >= 1.")
        options["scale_factor"] = factor
    if method.scaling in OPTION_APPLIES_TO["original_max_position_embeddings"]:
        options["original_max_position_embeddings"] = parent_block_size
    return options | dict(method.options)


_SCALING_KEYS = ("scaling", "scale_factor", *OPTION_APPLIES_TO)


def parent_options(choice: Any) -> dict[str, Any]:
    """A :class:`~ropelm.variants.VariantChoice`'s options without the extension's scaling."""
    return {key: value for key, value in choice.options if key not in _SCALING_KEYS}


def extension_config(
    parent: ExperimentConfig,
    parent_run: Path,
    method: ExtensionMethod,
    *,
    block_size: int,
    scale_factor: float | None = None,
    steps: int = DEFAULT_STEPS,
    overrides: Iterable[str] = (),
) -> ExperimentConfig:
    """The configuration of the run that extends ``parent`` (validated, not yet bound)."""
    model = parent.model
    options = scaled_options(model.att_options, method, model.block_size, block_size, scale_factor)
    raw = parent.model_dump(mode="json")
    raw["name"] = extension_name(parent_run, method, block_size)
    raw["model"] |= {"block_size": block_size, "att_options": options}
    raw["train"] |= {"max_steps": steps}
    raw["init"] = {"from_run": str(Path(parent_run).resolve()), "method": method.label}
    return validate(apply_overrides(raw, overrides))


def extension_name(parent_run: Path, method: ExtensionMethod, block_size: int) -> str:
    """``RoPE-SM-seed0-extend-yarn-512``: the parent's folder, the method and the new block."""
    return f"{Path(parent_run).resolve().name}-extend-{method.label}-{block_size}"


def check_extensible(parent: ExperimentConfig, child: ExperimentConfig, registry: Any) -> None:
    """Refuse, in one sentence, a method the variant lacks or weights that cannot grow.

    ``registry`` resolves both configurations; a variant whose options have no
    ``scaling`` accepts only the method ``none``; a parameter whose shape depends on
    the block size (Learned-APE's position table) makes the run unextendable.
    """
    spec = registry.get(parent.model.att_type)
    fields = _option_fields(spec)
    if "scaling" not in fields and child.init.method != "none":
        raise ConfigError(
            f"'{parent.model.att_type}' has no RoPE, so no RoPE scaling applies; extend it with "
            "--block-size alone (method none)."
        )
    old, new = _parameter_shapes(parent, registry), _parameter_shapes(child, registry)
    for name, shape in old.items():
        if new.get(name) != shape:
            raise ConfigError(
                f"'{parent.model.att_type}' cannot be extended: its parameter {name} has shape "
                f"{shape} at block size {parent.model.block_size} and {new.get(name)} at "
                f"{child.model.block_size} (a position table sized by the block)."
            )


def _option_fields(spec: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(spec.options)} if spec.options else set()


def _parameter_shapes(config: ExperimentConfig, registry: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model ``config`` builds, on the meta device (no memory)."""
    import torch

    from ropelm.model import TransformerLM

    attention = registry.resolve(config.model)
    with torch.device("meta"):
        model = TransformerLM(config.model, attention)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def plan_extension(
    parent_run: Path,
    method: ExtensionMethod,
    *,
    block_size: str,
    scale_factor: float | None = None,
    steps: int = DEFAULT_STEPS,
    overrides: Iterable[str] = (),
    trust_plugins: bool = False,
    plugins: Iterable[str] = (),
) -> Any:
    """The bound :class:`ropelm.Experiment` that extends ``parent_run``, checked before any work.

    Raises:
        ropelm.RopelmError: no finished parent (no best checkpoint), a block size not
            above the parent's, a method the variant lacks, a factor below 1, a bad
            ``--set``: one sentence each; the parent run is only read.
    """
    from ropelm.checkpoint import checkpoint_registry, resolve_checkpoint
    from ropelm.experiment import Experiment
    from ropelm.runs import RunDir

    parent = validate(RunDir(parent_run).read_config())
    resolve_checkpoint(Path(parent_run), "best")  # a run still training has none: say so now
    registry = checkpoint_registry(parent_run, trust_plugins=trust_plugins, plugins=plugins)
    child = extension_config(
        parent, parent_run, method,
        block_size=parse_block_size(block_size, parent.model.block_size),
        scale_factor=scale_factor, steps=steps, overrides=overrides,
    )  # fmt: skip
    check_extensible(parent, child, registry)
    return Experiment.bind(child, registry)


def default_extension_dir(parent_run: Path, experiment: Any) -> Path:
    """Beside the parent: ``runs/quickstart`` -> ``runs/quickstart-extend-yarn-512``."""
    return Path(parent_run).resolve().parent / experiment.config.name
