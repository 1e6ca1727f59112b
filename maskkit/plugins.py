"""The one plugin manager: loads every entry point of the ``maskkit`` group.

Built-in policies and prior providers (the package ``maskkit_plugins``, its own folder in the
source tree) and third-party ones are found the same way. A plugin that fails to import
or register is recorded as a :class:`PluginFailure` and reported in one line; the rest still load.

Names are unique. When two distributions use the same entry-point name, or the same policy or
prior-provider name, the first in :data:`LOAD_ORDER` keeps it and the other's is skipped, reported
as a :class:`NameClash` that says which one won and what to rename.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from maskkit import hookspecs
from maskkit.errors import MaskkitError, PluginError, UnknownNameError
from maskkit.policy import MASK_LEVEL, PRETRAIN_LEVEL, MaskPolicy, PolicyContext
from maskkit.priors.provider import PriorProvider, resolved_options

ENTRY_POINT_GROUP = "maskkit"
OWN_DISTRIBUTION = "maskkit"
# The rule that settles a name clash, as messages and docs state it.
LOAD_ORDER = (
    "maskkit's own plugins load first, then the others by distribution name (A-Z), then by "
    "entry-point name; the first to claim a name keeps it"
)


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be loaded or registered."""

    entry_point: str
    distribution: str
    error: str

    def one_line(self) -> str:
        return (
            f"plugin '{self.entry_point}' from {self.distribution} failed to load: {self.error}. "
            f"Reinstall or uninstall '{self.distribution}'."
        )


@dataclass(frozen=True)
class NameClash(PluginFailure):
    """A name that two distributions claim; ``winner`` keeps it (:data:`LOAD_ORDER`).

    ``kind`` is ``"entry point"`` (the loser's whole plugin is skipped) or the kind of thing
    named, e.g. ``"policy"`` (only that policy is skipped; the plugin's others still load).
    """

    kind: str = "policy"
    name: str = ""
    winner: str = ""

    def one_line(self) -> str:
        if self.kind == "entry point":
            return (
                f"plugin '{self.entry_point}' from {self.distribution} is not loaded: {self.winner} "
                f"already uses the entry-point name '{self.name}' ({LOAD_ORDER}). Rename the entry "
                f"point in {self.distribution}'s pyproject.toml ([project.entry-points.maskkit]) and "
                "reinstall it."
            )
        return (
            f"{self.kind} name '{self.name}' is provided by both {self.winner} and "
            f"{self.distribution} (plugin '{self.entry_point}'); {self.winner}'s is used ({LOAD_ORDER}). "
            f"To use the one from {self.distribution}, give its class another `name` there and "
            "reinstall it."
        )


@dataclass(frozen=True)
class PolicyInfo:
    """A policy class and where it came from."""

    name: str
    policy_class: type[MaskPolicy]
    plugin: str
    distribution: str

    @property
    def description(self) -> str:
        return self.policy_class.description

    @property
    def learnable(self) -> bool:
        return self.policy_class.learnable

    @property
    def requires(self) -> frozenset[str]:
        return self.policy_class.requires

    @property
    def trains_at_pretrain_level(self) -> bool:
        """The pretrain level trains some of the policy's parameters
        (:meth:`~maskkit.policy.MaskPolicy.training_levels`)."""
        return PRETRAIN_LEVEL in self.policy_class.training_levels()

    @property
    def trained_by(self) -> str:
        """Which levels train the policy, for the ``learnable`` column of ``maskkit policies``: yes
        (level 3), pretrain level, yes + pretrain level, no."""
        levels = self.policy_class.training_levels()
        if MASK_LEVEL in levels:
            return "yes + pretrain level" if PRETRAIN_LEVEL in levels else "yes"
        return "pretrain level" if PRETRAIN_LEVEL in levels else "no"

    @property
    def training_levels(self) -> list[str]:
        """The levels that train the policy's parameters, for ``maskkit policies --json``
        (``trained_by``): ``"mask level"`` (level 3 of the MLO loop) and/or ``"pretrain level"``;
        empty for a fixed policy."""
        return [f"{level} level" for level in self.policy_class.training_levels()]


@dataclass(frozen=True)
class ProviderInfo:
    """A prior-provider class and where it came from."""

    name: str
    provider_class: type[PriorProvider]
    plugin: str
    distribution: str

    @property
    def description(self) -> str:
        return self.provider_class.description

    @property
    def provides(self) -> frozenset[str]:
        return frozenset(self.provider_class.provides)

    @property
    def option_defaults(self) -> dict[str, Any]:
        """The provider's options that have a default (its constructor's keyword arguments)."""
        parameters = inspect.signature(self.provider_class).parameters.values()
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@dataclass
class PluginRegistry:
    """What the installed plugins provide, and what failed to load."""

    manager: pluggy.PluginManager
    policies: dict[str, PolicyInfo]
    failures: list[PluginFailure]
    providers: dict[str, ProviderInfo]


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else "unknown distribution"


def _collect(
    hook: Any,
    base: type,
    make_info: Callable[[Any, str, str], Any],
    kind: str,
    distributions: dict[str, str],
    failures: list[PluginFailure],
) -> dict[str, Any]:
    """Call each plugin's implementation of ``hook`` separately, so each class knows its plugin.

    ``base`` is the class every returned class must subclass; ``make_info(cls, plugin,
    distribution)`` builds the registry entry; ``kind`` names the thing in messages.
    """
    found: dict[str, Any] = {}
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name
        distribution = distributions.get(plugin_name, "unknown distribution")
        try:
            provided = list(impl.function())
            for provided_class in provided:
                if not (isinstance(provided_class, type) and issubclass(provided_class, base)):
                    raise TypeError(f"{provided_class!r} is not a {base.__name__} subclass")
                if not isinstance(getattr(provided_class, "name", None), str):
                    raise TypeError(f"{provided_class.__name__} has no string 'name'")
        except Exception as error:  # a broken plugin must not take the others down
            failures.append(PluginFailure(plugin_name, distribution, f"{type(error).__name__}: {error}"))
            continue
        for provided_class in provided:
            if provided_class.name in found:
                first = found[provided_class.name]
                failures.append(
                    NameClash(
                        plugin_name,
                        distribution,
                        f"{kind} name '{provided_class.name}' is already provided by {first.distribution}",
                        kind=kind,
                        name=provided_class.name,
                        winner=first.distribution,
                    )
                )
                continue
            found[provided_class.name] = make_info(provided_class, plugin_name, distribution)
    return found


@functools.cache
def get_registry() -> PluginRegistry:
    """Load every ``maskkit`` entry point once per process."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    distributions: dict[str, str] = {}
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # LOAD_ORDER: maskkit's own plugins first, so a third-party name clash never hides a built-in.
    ordered = sorted(
        entry_points,
        key=lambda ep: (_distribution_name(ep) != OWN_DISTRIBUTION, _distribution_name(ep), ep.name),
    )
    for entry_point in ordered:
        distribution = _distribution_name(entry_point)
        if manager.get_plugin(entry_point.name) is not None:
            if distributions.get(entry_point.name) != distribution:
                winner = distributions.get(entry_point.name, "another distribution")
                failures.append(
                    NameClash(
                        entry_point.name,
                        distribution,
                        f"entry point name '{entry_point.name}' is already used by {winner}",
                        kind="entry point",
                        name=entry_point.name,
                        winner=winner,
                    )
                )
            continue  # else: the same distribution seen twice on sys.path
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=entry_point.name)
        except Exception as error:
            failures.append(PluginFailure(entry_point.name, distribution, f"{type(error).__name__}: {error}"))
            continue
        distributions[entry_point.name] = distribution
    policies = _collect(
        manager.hook.maskkit_policies,
        MaskPolicy,
        lambda cls, plugin, dist: PolicyInfo(cls.name, cls, plugin, dist),
        "policy",
        distributions,
        failures,
    )
    providers = _collect(
        manager.hook.maskkit_prior_providers,
        PriorProvider,
        lambda cls, plugin, dist: ProviderInfo(cls.name, cls, plugin, dist),
        "prior provider",
        distributions,
        failures,
    )
    return PluginRegistry(manager=manager, policies=policies, failures=failures, providers=providers)


def registry_as_dict(registry: PluginRegistry) -> dict:
    """What ``maskkit policies --json`` prints: the policies, then what failed to load or clashed."""
    return {
        "policies": [
            {
                "name": info.name,
                "distribution": info.distribution,
                "plugin": info.plugin,
                "learnable": info.learnable,
                "trained_by": info.training_levels,
                "requires": sorted(info.requires),
                "description": info.description,
            }
            for info in sorted(registry.policies.values(), key=lambda item: item.name)
        ],
        "failures": [
            {
                "plugin": failure.entry_point,
                "distribution": failure.distribution,
                "error": failure.error,
                "message": failure.one_line(),
            }
            for failure in registry.failures
        ],
    }


def providers_as_dict(registry: PluginRegistry) -> dict:
    """What ``maskkit priors list --json`` prints: the providers, then what failed to load."""
    return {
        "providers": [
            {
                "name": info.name,
                "distribution": info.distribution,
                "plugin": info.plugin,
                "provides": sorted(info.provides),
                "options": info.option_defaults,
                "description": info.description,
            }
            for info in sorted(registry.providers.values(), key=lambda item: item.name)
        ],
        "failures": registry_as_dict(registry)["failures"],
    }


def policy_info(name: str) -> PolicyInfo:
    """Look up an installed policy by name; the error lists the available ones."""
    registry = get_registry()
    if name not in registry.policies:
        raise UnknownNameError("policy", name, list(registry.policies), note=_load_failures_note(registry))
    return registry.policies[name]


def _load_failures_note(registry: PluginRegistry) -> str:
    """A sentence naming the plugins that failed to load (one of them may hold the name asked for)."""
    failed = [failure for failure in registry.failures if not isinstance(failure, NameClash)]
    if not failed:
        return ""
    listed = "; ".join(
        f"'{failure.entry_point}' from {failure.distribution} ({failure.error})" for failure in failed
    )
    plugins = "plugin" if len(failed) == 1 else "plugins"
    return (
        f"{len(failed)} {plugins} failed to load and may provide it: {listed}. `maskkit policies` lists them."
    )


def create_policy(name: str, context: PolicyContext, options: dict | None = None) -> MaskPolicy:
    """Build the policy ``name`` with the model ``context`` and its ``options``."""
    info = policy_info(name)
    try:
        policy = info.policy_class(context, **(options or {}))
    except TypeError as error:
        raise PluginError(
            f"policy '{name}' ({info.distribution}) rejected its options {options or {}}: {error}. "
            "Check policy_options in the config."
        ) from error
    except Exception as error:
        raise PluginError(
            f"policy '{name}' ({info.distribution}) failed to construct: {type(error).__name__}: {error}"
        ) from error
    return policy


def provider_info(name: str) -> ProviderInfo:
    """Look up an installed prior provider by name; the error lists the available ones."""
    registry = get_registry()
    if name not in registry.providers:
        raise UnknownNameError("prior provider", name, list(registry.providers))
    return registry.providers[name]


def provider_options(name: str, options: dict | None = None) -> dict[str, Any]:
    """The options of provider ``name`` with its defaults filled in (the store's key holds them)."""
    info = provider_info(name)
    try:
        return resolved_options(info.provider_class, dict(options or {}))
    except TypeError as error:
        raise PluginError(
            f"prior provider '{name}' ({info.distribution}) rejected its options {options or {}}: {error}. "
            "Check prior_options in the config (or --option KEY=VALUE)."
        ) from None


def create_provider(name: str, options: dict | None = None) -> PriorProvider:
    """Build the prior provider ``name`` with its ``options``."""
    info = provider_info(name)
    provider_options(name, options)  # unknown options: one clear line
    try:
        return info.provider_class(**(options or {}))
    except MaskkitError:  # the provider's own message, e.g. a missing checkpoint
        raise
    except (TypeError, ValueError) as error:
        raise PluginError(
            f"prior provider '{name}' ({info.distribution}) rejected its options {options or {}}: {error}"
        ) from None
    except Exception as error:
        raise PluginError(
            f"prior provider '{name}' ({info.distribution}) failed to construct: "
            f"{type(error).__name__}: {error}"
        ) from error
