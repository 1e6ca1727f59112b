"""The one plugin manager: loads every entry point of the ``maskkit`` group.

Built-in policies (``plugins/`` in the source tree, package ``maskkit_plugins``) and third-party
ones are found the same way. A plugin that fails to import or register is recorded as a
:class:`PluginFailure` and reported in one line; the rest still load.

Names are unique. When two distributions use the same entry-point name or the same policy name,
the first in :data:`LOAD_ORDER` keeps it and the other's is skipped, reported as a
:class:`NameClash` that says which one won and what to rename.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

import pluggy

from maskkit import hookspecs
from maskkit.errors import PluginError, UnknownNameError
from maskkit.policy import MaskPolicy, PolicyContext

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


@dataclass
class PluginRegistry:
    """What the installed plugins provide, and what failed to load."""

    manager: pluggy.PluginManager
    policies: dict[str, PolicyInfo]
    failures: list[PluginFailure]


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else "unknown distribution"


def _collect_policies(
    manager: pluggy.PluginManager, distributions: dict[str, str], failures: list[PluginFailure]
) -> dict[str, PolicyInfo]:
    """Call each plugin's ``maskkit_policies`` separately, so each policy knows its plugin."""
    policies: dict[str, PolicyInfo] = {}
    for impl in manager.hook.maskkit_policies.get_hookimpls():
        plugin_name = impl.plugin_name
        distribution = distributions.get(plugin_name, "unknown distribution")
        try:
            provided = list(impl.function())
            for policy_class in provided:
                if not (isinstance(policy_class, type) and issubclass(policy_class, MaskPolicy)):
                    raise TypeError(f"{policy_class!r} is not a MaskPolicy subclass")
                if not isinstance(getattr(policy_class, "name", None), str):
                    raise TypeError(f"{policy_class.__name__} has no string 'name'")
        except Exception as error:  # a broken plugin must not take the others down
            failures.append(PluginFailure(plugin_name, distribution, f"{type(error).__name__}: {error}"))
            continue
        for policy_class in provided:
            if policy_class.name in policies:
                first = policies[policy_class.name]
                failures.append(
                    NameClash(
                        plugin_name,
                        distribution,
                        f"policy name '{policy_class.name}' is already provided by {first.distribution}",
                        kind="policy",
                        name=policy_class.name,
                        winner=first.distribution,
                    )
                )
                continue
            policies[policy_class.name] = PolicyInfo(
                policy_class.name, policy_class, plugin_name, distribution
            )
    return policies


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
    policies = _collect_policies(manager, distributions, failures)
    return PluginRegistry(manager=manager, policies=policies, failures=failures)


def registry_as_dict(registry: PluginRegistry) -> dict:
    """What ``maskkit policies --json`` prints: the policies, then what failed to load or clashed."""
    return {
        "policies": [
            {
                "name": info.name,
                "distribution": info.distribution,
                "plugin": info.plugin,
                "learnable": info.learnable,
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
    if info.requires:
        raise PluginError(
            f"policy '{name}' ({info.distribution}) needs the priors {sorted(info.requires)}, "
            "and no installed prior provider supplies them; pick a policy that needs none "
            "(`maskkit policies` lists what each needs)"
        )
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
