"""The plugin registry in-process, with fake entry points: each kind of broken plugin isolated
and reported in one line, name clashes settled by the load order, the cache, the user errors of
an unknown or unbuildable policy; and the real registry holding the built-ins."""

from __future__ import annotations

import pytest
from plugin_packages import BUILT_INS, FakeEntryPoint, make_policy, plugin_module

import maskkit.plugins as plugins_module
from maskkit.errors import PluginError, UnknownNameError
from maskkit.plugins import NameClash, PluginFailure, create_policy, get_registry, policy_info
from maskkit.policy import MaskPolicy, PolicyContext

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch):
    """Install fake entry points; the cached registry is cleared before and after."""

    def install(*entry_points: FakeEntryPoint) -> None:
        def entry_points_for(group: str | None = None, **_: object) -> list[FakeEntryPoint]:
            return list(entry_points) if group == "maskkit" else []

        monkeypatch.setattr(plugins_module.importlib.metadata, "entry_points", entry_points_for)
        get_registry.cache_clear()

    get_registry.cache_clear()
    yield install
    monkeypatch.undo()
    get_registry.cache_clear()


def test_registry_isolates_each_kind_of_broken_plugin(fake_entry_points) -> None:
    def explode() -> object:
        raise ImportError("No module named 'numpyy'")

    fake_entry_points(
        FakeEntryPoint("good", lambda: plugin_module("good", make_policy("alpha")), "dist-good"),
        FakeEntryPoint("import-error", explode, "dist-import"),
        FakeEntryPoint("wrong-type", lambda: plugin_module("wrong", int), "dist-wrong"),
        FakeEntryPoint(
            "raises", lambda: plugin_module("raises", error=RuntimeError("hook broke")), "dist-raise"
        ),
        FakeEntryPoint("later-duplicate", lambda: plugin_module("dup", make_policy("alpha")), "dist-later"),
        FakeEntryPoint("nameless", lambda: plugin_module("nameless", type("X", (MaskPolicy,), {})), None),
    )
    registry = get_registry()
    assert set(registry.policies) == {"alpha"}
    assert registry.policies["alpha"].distribution == "dist-good"
    assert registry.policies["alpha"].plugin == "good"

    failures = {failure.entry_point: failure for failure in registry.failures}
    assert set(failures) == {"import-error", "wrong-type", "raises", "later-duplicate", "nameless"}
    assert failures["import-error"] == PluginFailure(
        "import-error", "dist-import", "ImportError: No module named 'numpyy'"
    )
    assert "not a MaskPolicy subclass" in failures["wrong-type"].error
    assert failures["raises"].error == "RuntimeError: hook broke"
    assert "already provided by dist-good" in failures["later-duplicate"].error
    assert "no string 'name'" in failures["nameless"].error
    assert failures["nameless"].distribution == "unknown distribution"
    for failure in registry.failures:
        line = failure.one_line()
        assert "\n" not in line
        assert f"'{failure.entry_point}'" in line and failure.distribution in line


def test_an_entry_point_name_clash_between_distributions_is_reported(fake_entry_points) -> None:
    fake_entry_points(  # listed in the "wrong" order: the rule, not discovery order, decides
        FakeEntryPoint("shared", lambda: plugin_module("second", make_policy("beta")), "dist-second"),
        FakeEntryPoint("shared", lambda: plugin_module("first", make_policy("alpha")), "dist-first"),
    )
    registry = get_registry()
    assert set(registry.policies) == {"alpha"}
    (clash,) = registry.failures
    assert isinstance(clash, NameClash) and clash.distribution == "dist-second"
    line = clash.one_line()
    assert "plugin 'shared' from dist-second is not loaded: dist-first already uses" in line
    assert "Rename the entry point in dist-second's pyproject.toml ([project.entry-points.maskkit])" in line
    assert "failed to load" not in line and "Reinstall or uninstall" not in line


def test_a_policy_name_clash_says_which_wins_and_what_to_rename(fake_entry_points) -> None:
    fake_entry_points(
        FakeEntryPoint(
            "zeta-plugin",
            lambda: plugin_module("z", make_policy("alpha"), make_policy("gamma")),
            "maskkit-zeta",
        ),
        FakeEntryPoint("beta-plugin", lambda: plugin_module("b", make_policy("alpha")), "maskkit-beta"),
        # A third party can never take a built-in's name, even one that sorts first.
        FakeEntryPoint("aaa", lambda: plugin_module("a", make_policy("random")), "aaa-masks"),
        FakeEntryPoint("random", lambda: plugin_module("r", make_policy("random")), "maskkit"),
    )
    registry = get_registry()
    # The rule: maskkit's own first, then by distribution name (maskkit-beta < maskkit-zeta).
    assert registry.policies["alpha"].distribution == "maskkit-beta"
    assert registry.policies["random"].distribution == "maskkit"
    assert registry.policies["gamma"].distribution == "maskkit-zeta"  # the loser's other policies load
    clashes = {failure.name: failure for failure in registry.failures}
    assert set(clashes) == {"alpha", "random"} and all(isinstance(c, NameClash) for c in clashes.values())
    line = clashes["alpha"].one_line()
    assert line.startswith(
        "policy name 'alpha' is provided by both maskkit-beta and maskkit-zeta (plugin 'zeta-plugin'); "
        "maskkit-beta's is used (maskkit's own plugins load first, then the others by distribution name"
    )
    assert "give its class another `name` there and reinstall it" in line
    assert "failed to load" not in line and "Reinstall or uninstall" not in line
    assert "is provided by both maskkit and aaa-masks" in clashes["random"].one_line()
    # A clash is not a load failure: an unknown name does not blame it.
    with pytest.raises(UnknownNameError) as caught:
        policy_info("nosuch")
    assert "failed to load" not in str(caught.value)


def test_registry_is_cached_until_cleared(fake_entry_points) -> None:
    fake_entry_points(FakeEntryPoint("one", lambda: plugin_module("one", make_policy("first")), "d1"))
    assert get_registry() is get_registry()
    assert set(get_registry().policies) == {"first"}
    fake_entry_points(FakeEntryPoint("two", lambda: plugin_module("two", make_policy("second")), "d2"))
    assert set(get_registry().policies) == {"second"}


def test_unknown_and_unbuildable_policies_raise_user_errors(fake_entry_points) -> None:
    fake_entry_points(
        FakeEntryPoint("good", lambda: plugin_module("good", make_policy("alpha")), "dist-good"),
        FakeEntryPoint("bad", lambda: plugin_module("bad", make_policy("beta", True)), "dist-bad"),
    )
    with pytest.raises(UnknownNameError, match=r"unknown policy 'nosuch'\. Available: alpha, beta\."):
        policy_info("nosuch")
    with pytest.raises(
        PluginError, match=r"policy 'beta' \(dist-bad\) failed to construct: ValueError: bad scale"
    ):
        create_policy("beta", CONTEXT)
    with pytest.raises(PluginError, match=r"policy 'alpha' \(dist-good\) rejected its options \{'nope': 1\}"):
        create_policy("alpha", CONTEXT, {"nope": 1})
    policy = create_policy("alpha", CONTEXT, {"scale": 2.0})
    assert policy.scale == 2.0 and policy.context == CONTEXT


def test_the_real_registry_holds_the_built_ins() -> None:
    get_registry.cache_clear()
    try:
        registry = get_registry()
        missing = sorted(BUILT_INS - set(registry.policies))
        assert not missing, (
            f"{missing}: a plugin module provides them, but no entry point loads it: add its line to "
            "pyproject.toml's [project.entry-points.maskkit] and reinstall (pip install -e .)"
        )
        assert registry.failures == []
        for name in BUILT_INS:
            assert registry.policies[name].distribution == "maskkit"
        assert registry.policies["random"].plugin == "random"
        assert registry.policies["mlo-light"].plugin == "mlo"
    finally:
        get_registry.cache_clear()
