"""Plugin manager and the component registries built from the hooks.

Built-in components register through the same hooks as third-party packages; entry
points in the ``tiahnm`` group are loaded one by one so that a plugin that fails to
import is reported by name and does not stop the others.

Environment switches:

* ``TIAHNM_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party entry points.
* ``TIAHNM_LOAD_PLUGINS=a,b``: load only the entry points with these names.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tiahnm import hookspecs
from tiahnm.errors import ConfigError, PluginError
from tiahnm.utils.options import (
    OptionSpec,
    check_values,
    markdown_table,
    signature_spec,
    spec_of,
)

logger = logging.getLogger(__name__)

KINDS: dict[str, str] = {
    "head": "tiahnm_register_heads",
    "miner": "tiahnm_register_miners",
    "loss": "tiahnm_register_losses",
    "encoder": "tiahnm_register_encoders",
    "bag_source": "tiahnm_register_bag_sources",
    "callback": "tiahnm_register_callbacks",
    "task": "tiahnm_register_tasks",
}

DEFAULT_PLUGINS: tuple[str, ...] = (
    "tiahnm.heads.plugin",
    "tiahnm.miners.plugin",
    "tiahnm.losses.plugin",
    "tiahnm.data.plugin",
    "tiahnm.encoders.plugin",
    "tiahnm.callbacks.plugin",
    "tiahnm.tasks.plugin",
)


@dataclass(frozen=True)
class PluginEntry:
    """One registered component.

    Attributes:
        name (str): Name used in configs.
        kind (str): One of :data:`KINDS`.
        factory (Callable): Builds the component from keyword options.
        plugin (str): Name of the pluggy plugin that registered it.
        package (str): Distribution that provides it.
        version (str): Version of that distribution.
        description (str): One line for ``tiahnm plugins``.
        options (type | None): The declared options dataclass
            (:mod:`tiahnm.utils.options`); None: the factory's signature describes
            the options.
    """

    name: str
    kind: str
    factory: Callable[..., Any]
    plugin: str
    package: str
    version: str
    description: str = ""
    options: type | None = None

    def spec(self, *, n_args: int = 0) -> OptionSpec:
        """The options this component takes (declared class, else the signature)."""
        if self.options is not None:
            return spec_of(self.options)
        return signature_spec(self.factory, n_args=n_args)

    def check(
        self,
        options: Mapping[str, Any],
        *,
        key: str,
        n_args: int = 0,
        what: str | None = None,
    ) -> None:
        """Check ``options`` without building: names, then required, then values.

        Args:
            options (Mapping): The component's options from the config.
            key (str): Their config key (``miner.options``).
            n_args (int): Positional arguments the factory gets besides the options.
            what (str | None): The component, for a missing-option message; None
                skips the required-options check.

        Raises:
            ConfigError: Unknown option or (declared options) a bad value.
            PluginError: A required option is missing.
        """
        spec = self.spec(n_args=n_args)
        spec.check_names(options, key=key)
        if what is not None:
            spec.check_required(options, key=key, what=what)
        if self.options is not None:
            check_values(self.options, options, key=key)


@dataclass
class LoadFailure:
    """An entry point that could not be loaded."""

    name: str
    package: str
    error: str


@dataclass
class Registry(Mapping[str, PluginEntry]):
    """Components of one kind, by name."""

    kind: str
    entries: dict[str, PluginEntry] = field(default_factory=dict)
    #: Names registered by more than one plugin: using one is an error naming both.
    conflicts: dict[str, str] = field(default_factory=dict)
    claimants: dict[str, list[str]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PluginEntry:
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "(none)"
            msg = f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {known}."
            raise PluginError(msg) from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: str, default: PluginEntry | None = None) -> PluginEntry | None:  # type: ignore[override]
        """The entry named ``name``, or ``default``."""
        return self.entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def create(self, name: str, *args: Any, key: str = "", **options: Any) -> Any:
        """Build component ``name`` after checking ``options`` against its factory.

        Args:
            name (str): Registered name.
            *args: Positional arguments (e.g. ``in_dim``, ``n_classes`` for heads).
            key (str): Config key the options came from, for error messages.
            **options: Keyword options from the config.

        Returns:
            Any: The component.
        """
        entry = self[name]
        key = key or f"{self.kind}.options"
        entry.check(options, key=key, n_args=len(args), what=f"{self.kind} {name!r}")
        return entry.factory(*args, **options)


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    key: str,
    n_args: int = 0,
) -> None:
    """Raise :class:`ConfigError` naming any option ``factory`` does not accept."""
    signature_spec(factory, n_args=n_args).check_names(options, key=key)


def missing_options(
    factory: Callable[..., Any], options: Mapping[str, Any], *, n_args: int = 0
) -> list[str]:
    """Required keyword parameters of ``factory`` (after ``n_args``) not in ``options``."""
    return signature_spec(factory, n_args=n_args).missing(options)


def check_required(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    key: str,
    what: str,
    n_args: int = 0,
) -> None:
    """Raise :class:`PluginError` naming the required options missing from ``key``."""
    signature_spec(factory, n_args=n_args).check_required(options, key=key, what=what)


class PluginManager:
    """Loads plugins and builds one :class:`Registry` per component kind."""

    def __init__(self, *, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager("tiahnm")
        self.pm.add_hookspecs(hookspecs)
        self._load_failures: list[LoadFailure] = []
        self._build_failures: list[LoadFailure] = []
        for modname in DEFAULT_PLUGINS:
            self.pm.register(importlib.import_module(modname), name=modname)
        if autoload is None:
            autoload = not os.environ.get("TIAHNM_DISABLE_PLUGIN_AUTOLOAD")
        if autoload:
            self._load_entrypoints()
        self.pm.check_pending()
        self._registries: dict[str, Registry] | None = None

    def _load_entrypoints(self) -> None:
        only = os.environ.get("TIAHNM_LOAD_PLUGINS")
        allowed = {n.strip() for n in only.split(",")} if only else None
        seen: set[str] = set()
        for ep in md.entry_points(group="tiahnm"):
            if ep.name in seen or (allowed is not None and ep.name not in allowed):
                continue
            seen.add(ep.name)
            try:
                self.pm.load_setuptools_entrypoints("tiahnm", name=ep.name)
                # A misspelled hook in this plugin fails here, not for every plugin.
                self.pm.check_pending()
            except (Exception, SystemExit) as exc:  # sys.exit() at import included
                if self.pm.get_plugin(ep.name) is not None:
                    self.pm.unregister(name=ep.name)
                package = ep.dist.name if ep.dist else "?"
                failure = LoadFailure(ep.name, package, f"{type(exc).__name__}: {exc}")
                self._load_failures.append(failure)
                logger.warning(
                    "tiahnm plugin %r from package %r failed to load and is skipped: %s",
                    ep.name,
                    package,
                    failure.error,
                )

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module at run time (e.g. in tests).

        A plugin with a misspelled hook is rejected (and not left registered).
        """
        registered = self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=registered)
            msg = f"Plugin {registered!r} implements unknown hooks: {exc}"
            raise PluginError(msg) from None
        self._registries = None

    def unregister(self, name: str) -> None:
        """Remove a plugin registered with :meth:`register`."""
        self.pm.unregister(name=name)
        self._registries = None

    def _distinfo(self) -> dict[int, tuple[str, str]]:
        info = {}
        for plugin, dist in self.pm.list_plugin_distinfo():
            info[id(plugin)] = (dist.project_name, dist.version)
        return info

    @property
    def registries(self) -> dict[str, Registry]:
        """The component registries, built on first use."""
        if self._registries is None:
            self._registries = self._build()
        return self._registries

    @property
    def failures(self) -> list[LoadFailure]:
        """Plugins that failed to import, register hooks that raised, duplicate names."""
        _ = self.registries  # registering is where hooks fail and names clash
        return [*self._load_failures, *self._build_failures]

    def _build(self) -> dict[str, Registry]:
        self._build_failures = []
        distinfo = self._distinfo()
        own_version = _own_version()
        registries = {kind: Registry(kind) for kind in KINDS}
        for kind, hookname in KINDS.items():
            registry = registries[kind]
            for impl in getattr(self.pm.hook, hookname).get_hookimpls():
                plugin_name = impl.plugin_name
                if plugin_name in DEFAULT_PLUGINS:
                    package, version = "tiahnm", own_version
                else:
                    package, version = distinfo.get(id(impl.plugin), (plugin_name, "?"))
                register = _make_register(registry, plugin_name, package, version)
                before = set(registry.entries)
                try:
                    impl.function(register=register)
                except (Exception, SystemExit) as exc:  # one plugin must not stop all
                    for name in set(registry.entries) - before:  # all or nothing
                        del registry.entries[name]
                    self._hook_failed(plugin_name, package, hookname, exc)
            for name, message in registry.conflicts.items():
                self._build_failures.append(LoadFailure(name, "(duplicate)", message))
                logger.warning("%s", message)
        return registries

    def _hook_failed(
        self, plugin_name: str, package: str, hookname: str, exc: BaseException
    ) -> None:
        """Record a plugin whose register hook raised (its other entries stay)."""
        failure = LoadFailure(
            plugin_name, package, f"{hookname} raised {type(exc).__name__}: {exc}"
        )
        self._build_failures.append(failure)
        logger.warning(
            "tiahnm plugin %r (%s): %s; its components of this kind are skipped.",
            plugin_name,
            package,
            failure.error,
        )

    def get(self, kind: str) -> Registry:
        """Registry of ``kind`` (``head``, ``miner``, ``loss``, ``encoder``, ``bag_source``)."""
        if kind not in KINDS:
            msg = f"Unknown plugin kind {kind!r}. Kinds: {', '.join(KINDS)}."
            raise PluginError(msg)
        return self.registries[kind]

    def table(self) -> list[dict[str, str]]:
        """Rows for ``tiahnm plugins``: name, kind, package, version, description."""
        rows = []
        for kind in KINDS:
            for name in self.get(kind):
                e = self.get(kind)[name]
                rows.append(
                    {
                        "name": e.name,
                        "kind": e.kind,
                        "package": e.package,
                        "version": e.version,
                        "plugin": e.plugin,
                        "description": e.description,
                    }
                )
        return rows


def options_markdown(manager: PluginManager | None = None) -> list[str]:
    """Markdown sections documenting every declared options class, kind by kind.

    Args:
        manager (PluginManager | None): Whose components (default: the built-ins
            alone, so that the generated docs do not depend on what is installed).

    Returns:
        list[str]: Lines: one ``###`` section and table per component.
    """
    manager = manager or PluginManager(autoload=False)
    lines: list[str] = []
    for kind in KINDS:
        for name in manager.get(kind):
            entry = manager.get(kind)[name]
            if entry.options is None:
                continue
            lines += [
                f"### {kind} `{name}` (`{kind_key(kind)}`)",
                "",
                f"{entry.description}. Declared by `{entry.options.__qualname__}` "
                f"in `{entry.options.__module__}`.",
                "",
                *markdown_table(entry.spec()),
                "",
            ]
    return lines


def kind_key(kind: str) -> str:
    """Config key of a kind's options (``miner.options``, ``losses[i].options`` ...)."""
    return {
        "bag_source": "data.options",
        "loss": "losses[i].options",
        "callback": "callbacks[i].options",
        "encoder": "extract.encoder_options",
    }.get(kind, f"{kind}.options")


def _make_register(
    registry: Registry, plugin_name: str, package: str, version: str
) -> Callable[..., None]:
    def register(
        name: str,
        factory: Callable[..., Any],
        *,
        description: str = "",
        options: type | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            msg = f"Plugin {plugin_name!r} registered a {registry.kind} with an empty name."
            raise PluginError(msg)
        who = f"{plugin_name!r} ({package})"
        if name in registry.entries or name in registry.conflicts:
            # Both stay out of use (which one a config meant is unknown); every other
            # component and command keeps working, and `tiahnm plugins` shows this.
            other = registry.entries.pop(name, None)
            owners = registry.claimants.setdefault(name, [])
            if other is not None:
                owners.append(f"{other.plugin!r} ({other.package})")
            owners.append(who)
            registry.conflicts[name] = (
                f"Duplicate {registry.kind} name {name!r}: registered by "
                f"{' and by '.join(owners)}; uninstall or disable all but one (see "
                "TIAHNM_LOAD_PLUGINS in docs/plugins.md)."
            )
            return
        if not callable(factory):
            msg = f"Plugin {plugin_name!r}: factory for {registry.kind} {name!r} is not callable."
            raise PluginError(msg)
        if options is not None and not (
            isinstance(options, type) and dataclasses.is_dataclass(options)
        ):
            msg = (
                f"Plugin {plugin_name!r}: options of {registry.kind} {name!r} must be "
                f"a dataclass, got {options!r}."
            )
            raise PluginError(msg)
        registry.entries[name] = PluginEntry(
            name=name,
            kind=registry.kind,
            factory=factory,
            plugin=plugin_name,
            package=package,
            version=version,
            description=description,
            options=options,
        )

    return register


def _own_version() -> str:
    try:
        return md.version("tiahnm")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree
        from tiahnm import __version__

        return __version__


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use)."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager so the next call reloads plugins (tests)."""
    global _MANAGER
    _MANAGER = None


def get_registry(kind: str) -> Registry:
    """Shortcut for ``get_plugin_manager().get(kind)``."""
    return get_plugin_manager().get(kind)


def ensure_options_mapping(value: Any, key: str) -> dict[str, Any]:
    """Validate that a config value is a mapping of options."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        msg = f"{key} must be a mapping of option names to values, got {type(value).__name__}."
        raise ConfigError(msg)
    return dict(value)
