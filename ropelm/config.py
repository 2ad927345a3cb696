"""The experiment schema: YAML -> validated, typed configuration.

An experiment YAML has the sections ``model``, ``tokenizer``, ``data``,
``train``, ``eval`` and ``plugins``. This module validates all of them, once:
an unknown key is an error naming its dotted path and the closest valid key, a
wrong type names the path and the expected type. Code past this point trusts
the typed values.

It imports neither torch nor the plugin registry, so reading a configuration
(to train a tokenizer or prepare data) costs no model code. The attention
variant's own options (``model.att_options``) are the variant's business: they
are validated in one later step, :meth:`ropelm.registry.Registry.resolve`, when
the plugins are loaded (see :mod:`ropelm.experiment`).
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from ropelm.errors import ConfigError, format_validation_error

DEFAULT_HUB_DATASET = "lucadiliello/english_wikipedia"
RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean (``bool``, ``bool | str``, ...)."""
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Literal):
        return any(a is bool or isinstance(a, bool) or _accepts_bool(a)
                   for a in typing.get_args(annotation))  # fmt: skip
    return annotation is Any


class _NoBoolNumbers(pydantic.BaseModel):
    """Refuses YAML's true/false where a number is meant (pydantic would read true as 1)."""

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ValueError(f"expected a number or text, not the boolean {str(value).lower()}")
        return value


class ModelConfig(_NoBoolNumbers):
    """Model hyperparameters, validated on construction (the seed's names and defaults).

    ``att_options`` holds the options of the chosen attention variant; they are
    validated by that variant's own options type (``Registry.resolve``), never
    added here as keywords.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: PositiveInt = 1024
    vocab_size: PositiveInt = 32768
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 12
    n_embd: PositiveInt = 768
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bias: bool = True
    att_type: str = "RoPE-SM"
    pad_token_id: int | None = Field(None, ge=0)
    rope_theta: float = Field(10000.0, gt=0.0)
    att_options: dict[str, Any] = Field(default_factory=dict)
    # which kernel runs softmax attention (ropelm.kernels): auto | sdpa | flex | dense
    attention_backend: Literal["auto", "sdpa", "flex", "dense"] = "auto"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, ModelConfig, prefix="model")) from None

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change one of them"
            )
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be below vocab_size ({self.vocab_size})"
            )
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class _Section(_NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerConfig(_Section):
    """Byte-level BPE training. The vocabulary size is ``model.vocab_size``."""

    min_frequency: PositiveInt = 2
    max_documents: PositiveInt | None = None  # cap on training documents
    max_characters: PositiveInt | None = None  # cap on training characters
    batch_size: PositiveInt = 1000  # documents per batch fed to the trainer


class DataConfig(_Section):
    """Where the corpus comes from, how it is split, where token files are cached."""

    source: Literal["wiki-sample", "hub", "files", "passkey"] = "wiki-sample"
    name: str = DEFAULT_HUB_DATASET  # hub: dataset name
    config_name: str | None = None  # hub: dataset configuration
    split: str = "train"  # hub: split to stream
    paths: list[str] = Field(default_factory=list)  # files: paths or globs
    text_column: str | None = None  # detected when not given
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_documents: PositiveInt | None = None
    passkey_filler_words: int = Field(24, ge=0)  # passkey: each document has 0..N filler words
    cache_dir: str = "data_cache"
    num_proc: PositiveInt = 1

    @pydantic.model_validator(mode="after")
    def _paths_for_files(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("source 'files' needs data.paths (files or globs)")
        return self


class TrainConfig(_Section):
    """Optimisation and training-loop settings (the seed's names and defaults)."""

    num_epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None  # overrides num_epochs when set
    batch_size: PositiveInt = 8  # windows per process and micro-batch
    grad_accum_steps: PositiveInt = 1
    # global batch in tokens: derives grad_accum_steps from batch_size, block_size and the
    # number of processes, so one recipe means the same optimisation on any hardware
    tokens_per_step: PositiveInt | None = None
    learning_rate: PositiveFloat = 3e-4
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine floor, as a fraction of the peak
    warmup_steps: NonNegativeInt = 0
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables clipping
    tokens_per_epoch: PositiveInt | None = None  # default: the size of the training split
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto"] | bool = "auto"  # auto: torch.compile on CUDA, not on the CPU
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate, or shard (FSDP2)
    document_mask: bool = False  # attend only within documents (split at <|endoftext|>)
    device: str = "auto"
    seed: int = 0
    eval_every: PositiveInt | None = None  # steps; evaluation also runs after each epoch
    log_every: PositiveInt = 10
    save_every: PositiveInt | None = None  # steps between "last" checkpoints
    threads: PositiveInt | None = None  # CPU threads for torch (None: its default; --threads wins)
    # where the scalars of metrics.jsonl also go (ropelm.loggers); jsonl is always written
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"]
    )

    @pydantic.model_validator(mode="after")
    def _one_way_to_accumulate(self) -> TrainConfig:
        if self.tokens_per_step is not None and self.grad_accum_steps != 1:
            raise ValueError(
                "set train.tokens_per_step or train.grad_accum_steps, not both "
                "(tokens_per_step derives the accumulation steps)"
            )
        return self

    @pydantic.field_validator("loggers")
    @classmethod
    def _each_logger_once_jsonl_always(cls, loggers: list[str]) -> list[str]:
        repeated = [name for name in dict.fromkeys(loggers) if loggers.count(name) > 1]
        if repeated:
            raise ValueError(f"'{repeated[0]}' is listed twice; list each logger once")
        return ["jsonl", *(name for name in loggers if name != "jsonl")]

    @pydantic.field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("both betas must be in [0, 1)")
        return betas


class EvalConfig(_Section):
    """Validation and length-extrapolation evaluation."""

    batch_size: PositiveInt | None = None  # default: train.batch_size
    max_batches: PositiveInt | None = None  # cap on validation windows per evaluation
    lengths: list[str] = Field(default_factory=lambda: ["1x"])  # e.g. 1x,2x or 2048


class InitConfig(_Section):
    """Where the weights start: fresh (the default) or a parent run's best checkpoint."""

    from_run: str | None = None  # a run directory whose best checkpoint initialises the model
    method: str | None = None  # what the run does with it (an extension method), for the record


class ExperimentConfig(_Section):
    """A whole experiment, as read from YAML."""

    name: str = "experiment"  # the run directory's name under runs/: one path component
    plugins: list[str] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    init: InitConfig = Field(default_factory=InitConfig)

    @pydantic.field_validator("name")
    @classmethod
    def _name_is_one_path_component(cls, name: str) -> str:
        if not RUN_NAME.match(name) or name in (".", ".."):
            raise ValueError(
                "use letters, digits, '-', '_' and '.' only (it names the folder under runs/; "
                "put a run elsewhere with --out)"
            )
        return name


def parse_value(text: str) -> Any:
    """A value written on the command line, read as YAML: ``"16"`` -> 16, ``"null"`` -> None.

    Text that is not valid YAML stays the string it is; an empty value is None.
    """
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.batch_size=16"`` -> (["train", "batch_size"], 16); the value is YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set '{text}': write overrides as key.path=value, e.g. train.batch_size=16."
        )
    return key.strip().split("."), parse_value(value)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` override applied (validated later)."""
    result = copy.deepcopy(dict(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{text}': '{part}' is not a section.")
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML safely; a syntax error names the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Experiment file {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Experiment file {path} cannot be read ({err}).") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}; fix the YAML syntax there.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, train:, ...)."
        )
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (which would
    silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validate(raw: Mapping[str, Any], *, base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` (the schema; no plugins).

    ``plugins`` entries that are ``.py`` paths are resolved against ``base_dir``
    (the YAML's folder). ``model.att_type`` and ``model.att_options`` are checked
    later, against the registry the experiment's plugins make (``Registry.resolve``).
    """
    raw = dict(raw)
    if base_dir is not None and isinstance(raw.get("plugins"), list):
        raw["plugins"] = [_resolve_plugin_path(p, base_dir) for p in raw["plugins"]]
    try:
        config = ExperimentConfig.model_validate(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, ExperimentConfig)) from None
    return config


def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment YAML (the schema; see :func:`validate`).

    It also checks that the packages of ``train.loggers`` are installed, so a missing
    one is reported before any work (a saved run's config, read by :func:`validate`
    alone, is not asked for packages it will not use).
    """
    from ropelm.loggers import check_installed

    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    config = validate(raw, base_dir=path.parent)
    check_installed(config.train.loggers)
    return config


def _resolve_plugin_path(ref: Any, base_dir: Path) -> Any:
    if isinstance(ref, str) and ref.endswith(".py") and not Path(ref).is_absolute():
        return str((base_dir / ref).resolve())
    return ref


def to_yaml(config: ExperimentConfig) -> str:
    """The resolved configuration as YAML (saved in every run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
