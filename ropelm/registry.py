"""The registry of attention variants, built on a pluggy plugin manager.

Plugins come from three places, all through the same hook
(``ropelm_register_attention``):

1. the built-ins in ``ropelm.plugins`` (listed in ``ropelm.plugins.BUILTIN_MODULES``);
2. installed packages that declare an entry point in the ``ropelm`` group::

       [project.entry-points.ropelm]
       my_attention = "my_package.attention"

3. modules an experiment names under ``plugins:`` (a dotted module path or a
   ``.py`` file).

A :class:`Registry` is an ordinary object (there is no global registry): a
command builds one with :meth:`Registry.default`, once, and passes it down to
everything that builds or loads a model. :meth:`Registry.resolve` is the one
step that validates ``model.att_type`` and ``model.att_options``; the
:class:`ropelm.attention.ResolvedAttention` it returns is what
:class:`ropelm.TransformerLM` is built from.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from ropelm import hookspecs
from ropelm.attention import AttentionSpec, ResolvedAttention
from ropelm.config import ModelConfig
from ropelm.errors import PluginError, UnknownAttentionError, did_you_mean

ENTRY_POINT_GROUP = "ropelm"


@dataclass(frozen=True)
class RegisteredVariant:
    """An attention spec together with where it came from."""

    spec: AttentionSpec
    source: str  # e.g. "builtin (ropelm.plugins.rope_sm)" or "my-pkg 1.0 (entry point x)"
    version: str | None = None


class Registry:
    """Attention variants by name, loaded from plugins."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._variants: dict[str, RegisteredVariant] = {}

    @classmethod
    def default(cls, plugin_modules: Iterable[str | Path] = ()) -> Registry:
        """Built-ins, installed entry points, then ``plugin_modules`` (from a YAML)."""
        registry = cls()
        registry.load_builtins()
        registry.load_entry_points()
        for ref in plugin_modules:
            registry.load_module(ref)
        return registry

    # -- loading --------------------------------------------------------------------------

    def load_builtins(self) -> None:
        from ropelm.plugins import BUILTIN_MODULES

        version = _package_version("ropelm")
        for name in BUILTIN_MODULES:
            module = importlib.import_module(name)
            self.register_plugin(module, source=f"builtin ({name})", version=version)

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_label = f"{dist.name} {dist.version}" if dist is not None else "unknown package"
            source = f"{dist_label} (entry point '{ep.name}' = {ep.value})"
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(
                    f"Plugin {source} failed to import ({type(err).__name__}: {err}); "
                    "fix or uninstall that package."
                ) from err
            self.register_plugin(
                plugin, source=source, version=dist.version if dist is not None else None
            )

    def load_module(self, ref: str | Path) -> ModuleType:
        """Import a plugin module by dotted path or ``.py`` file path and register it."""
        ref_str = str(ref)
        is_file = ref_str.endswith(".py") or "/" in ref_str or "\\" in ref_str
        try:
            module = _import_file(Path(ref_str)) if is_file else importlib.import_module(ref_str)
        except (Exception, SystemExit) as err:  # a plugin calling sys.exit() is an error too
            hint = (
                "check the path under `plugins:` in your experiment YAML"
                if is_file
                else "check the module name under `plugins:` and that its package is installed"
            )
            raise PluginError(
                f"Plugin module '{ref_str}' failed to import ({type(err).__name__}: {err}); {hint}."
            ) from err
        version = _file_version(Path(ref_str)) if is_file else getattr(module, "__version__", None)
        self.register_plugin(module, source=f"module {ref_str}", version=version)
        return module

    def register_plugin(self, plugin: object, source: str, version: str | None = None) -> None:
        """Register one plugin object (usually a module) and collect its variants."""
        if self._pm.is_registered(plugin):
            return  # the same module named twice (e.g. YAML and entry point): nothing new
        try:
            self._pm.register(plugin, name=source)
        except Exception as err:
            raise PluginError(
                f"Plugin {source} could not be registered ({err}); "
                "check its @ropelm.hookimpl functions against ropelm.hookspecs."
            ) from err
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        caller = self._pm.subset_hook_caller("ropelm_register_attention", remove_plugins=others)

        def register(spec: AttentionSpec) -> None:
            self._add(spec, source, version)

        try:
            caller(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(
                f"Plugin {source} failed while registering attention variants "
                f"({type(err).__name__}: {err}); fix the plugin or uninstall it."
            ) from err

    def _add(self, spec: object, source: str, version: str | None) -> None:
        if not isinstance(spec, AttentionSpec):
            raise PluginError(
                f"Plugin {source} called register() with {type(spec).__name__}, "
                "not a ropelm.AttentionSpec; build the spec with ropelm.AttentionSpec(...)."
            )
        if spec.name in self._variants:
            first = self._variants[spec.name].source
            raise PluginError(
                f"Attention name '{spec.name}' is registered twice, by {first} and by {source}; "
                "rename one of the variants or uninstall one of the plugins."
            )
        self._variants[spec.name] = RegisteredVariant(spec, source, version)

    # -- lookup ---------------------------------------------------------------------------

    def get(self, name: str) -> AttentionSpec:
        """The spec registered as ``name``; an unknown name lists the valid ones."""
        return self.variant(name).spec

    def variant(self, name: str) -> RegisteredVariant:
        try:
            return self._variants[name]
        except KeyError:
            names = sorted(self._variants)
            raise UnknownAttentionError(
                f"Unknown attention type '{name}'{did_you_mean(name, names)}; "
                f"registered types are {', '.join(names)}."
            ) from None

    def resolve(self, model: ModelConfig) -> ResolvedAttention:
        """Validate ``model.att_type`` and ``model.att_options``: the variant, parsed.

        Raises:
            UnknownAttentionError: no variant of that name (the closest is suggested).
            ConfigError: a bad option, or a model shape the variant rejects.
        """
        variant = self.variant(model.att_type)
        return ResolvedAttention.resolve(
            variant.spec, model, source=variant.source, version=variant.version
        )

    def names(self) -> list[str]:
        return sorted(self._variants)

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def __iter__(self) -> Iterator[RegisteredVariant]:
        return iter(sorted(self._variants.values(), key=lambda v: v.spec.name))

    def __len__(self) -> int:
        return len(self._variants)


def _import_file(path: Path) -> ModuleType:
    """Import a ``.py`` file as a uniquely named module (so two files may share a stem)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"ropelm_user_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_version(path: Path) -> str | None:
    """A plugin file's version: ``sha256:`` and the first 12 hex digits of its content."""
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return None
