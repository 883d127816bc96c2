"""The plugin system: hooks, registries, entry-point loading and option checking.

Every hook in :mod:`tiahnm.hookspecs` has a ``test_hook_<hookname>`` test here, which
registers a small plugin object through that hook on a fresh manager and uses what it
registered; :func:`test_every_hook_has_a_test` keeps that true when hooks are added.
"""

from __future__ import annotations

import inspect
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tiahnm
from tiahnm import hookspecs
from tiahnm.config import TrainConfig, from_dict
from tiahnm.data.bag import Bag, BagSource
from tiahnm.errors import ConfigError, PluginError
from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.hookspecs import hookimpl
from tiahnm.losses.base import BatchLoss
from tiahnm.miners.base import FitContext, Miner
from tiahnm.plugins import (
    DEFAULT_PLUGINS,
    KINDS,
    PluginManager,
    get_plugin_manager,
    get_registry,
    reset_plugin_manager,
)

REPO_ROOT = Path(__file__).parents[1]
EXAMPLE_PLUGIN = REPO_ROOT / "plugins" / "tiahnm-topk-miner"

BUILTINS = {
    "head": {"abmil", "abmil_gated", "dsmil", "mean_pool", "max_pool"},
    "miner": {"none"},
    "loss": {"mirank"},
    "encoder": {"small_cnn"},
    "bag_source": {"h5_folder", "mil_csv"},
    "callback": {"csv_log", "tensorboard", "mlflow"},
}


def hook_names() -> list[str]:
    """Names of every hook specification in :mod:`tiahnm.hookspecs`."""
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, "tiahnm_spec")
    )


def fresh_manager(*plugins: tuple[object, str]) -> PluginManager:
    """A manager with the built-ins, no entry points, and ``plugins`` registered."""
    pm = PluginManager(autoload=False)
    for plugin, name in plugins:
        pm.register(plugin, name=name)
    return pm


def make_bags(n: int = 4, n_instances: int = 5, dim: int = 8) -> list[Bag]:
    """Tiny random bags with alternating labels."""
    g = torch.Generator().manual_seed(0)
    return [
        Bag(
            slide_id=f"bag{i}",
            label=i % 2,
            features=torch.randn(n_instances, dim, generator=g),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------
# Components the test plugins register.


class TinyHead(MILHead):
    """Mean of projected instances, then a linear classifier."""

    supported_scores = ("attention", "instance_prob")

    def __init__(self, in_dim: int, n_classes: int = 2, *, embed_dim: int = 8) -> None:
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, dropout=0.0)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        n = h.shape[0]
        a = torch.full((1, n), 1.0 / n, device=h.device)
        z = a @ h
        return MILOutput(
            bag_logits=self.classifier(z),
            bag_embedding=z,
            instance_embeddings=h,
            attention=a,
        )


class CountingMiner(Miner):
    """Plain training that counts the hook calls of the shared loop."""

    name = "counting"

    def __init__(self, *, keep: int = 2) -> None:
        self.keep = keep
        self.calls: dict[str, int] = {"fit_start": 0, "forward": 0, "after_step": 0}

    def on_fit_start(self, ctx: FitContext) -> None:
        self.calls["fit_start"] += 1

    def forward(
        self, ctx: FitContext, features: torch.Tensor, label: torch.Tensor, step: int
    ) -> tuple[MILOutput, dict[str, torch.Tensor]]:
        self.calls["forward"] += 1
        keep = torch.arange(min(self.keep, features.shape[0]))
        out = ctx.head(features, keep_idx=keep)
        assert out.instance_embeddings.shape[0] == keep.numel()
        return out, {}

    def after_step(self, ctx: FitContext, step: int) -> None:
        self.calls["after_step"] += 1


class NormLoss(BatchLoss):
    """``scale`` times the mean squared bag logit."""

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(
        self, head: MILHead, outputs: list[MILOutput], labels: list[int]
    ) -> torch.Tensor | None:
        if not outputs:
            return None
        return (
            self.scale
            * torch.stack([o.bag_logits.pow(2).mean() for o in outputs]).mean()
        )


def make_pool_encoder(*, out_dim: int = 4) -> nn.Module:
    """``[B, 3, H, W] -> [B, out_dim]``: global average pool and a linear layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, out_dim))


class RandomBags:
    """A bag source of ``n`` random bags."""

    def __init__(self, *, n: int = 3, dim: int = 8) -> None:
        self.n = n
        self.dim = dim

    def load(self) -> list[Bag]:
        return make_bags(self.n, dim=self.dim)


class HeadPlugin:
    @hookimpl
    def tiahnm_register_heads(self, register: hookspecs.Register) -> None:
        register("tiny_head", TinyHead, description="test head")


class MinerPlugin:
    @hookimpl
    def tiahnm_register_miners(self, register: hookspecs.Register) -> None:
        register("counting", CountingMiner, description="test miner")


class LossPlugin:
    @hookimpl
    def tiahnm_register_losses(self, register: hookspecs.Register) -> None:
        register("norm", NormLoss, description="test loss")


class EncoderPlugin:
    @hookimpl
    def tiahnm_register_encoders(self, register: hookspecs.Register) -> None:
        register("pool_encoder", make_pool_encoder, description="test encoder")


class BagSourcePlugin:
    @hookimpl
    def tiahnm_register_bag_sources(self, register: hookspecs.Register) -> None:
        register("random_bags", RandomBags, description="test bag source")


class CommandPlugin:
    @hookimpl
    def tiahnm_register_commands(self, cli: click.Group) -> None:
        @cli.command(name="hello-plugin")
        @click.option("--name", default="world")
        def hello(name: str) -> None:
            """Say hello (test plugin command)."""
            click.echo(f"hello {name} from a plugin")


# ---------------------------------------------------------------------------------
# One test per hook.


def test_every_hook_has_a_test() -> None:
    names = hook_names()
    assert names, "no hook specifications found in tiahnm.hookspecs"
    missing = [name for name in names if f"test_hook_{name}" not in globals()]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"
    # Every register hook except commands backs one registry kind.
    assert set(KINDS.values()) | {"tiahnm_register_commands"} == set(names)


def test_hook_tiahnm_register_heads() -> None:
    pm = fresh_manager((HeadPlugin(), "test-heads"))
    entry = pm.get("head")["tiny_head"]
    assert (entry.plugin, entry.package, entry.version) == (
        "test-heads",
        "test-heads",
        "?",
    )
    assert entry.description == "test head"
    head = pm.get("head").create("tiny_head", 8, 3, key="head.options", embed_dim=4)
    assert isinstance(head, TinyHead)
    out = head(torch.randn(6, 8))
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (1, 3)
    assert head.instance_scores(out, "attention").shape == (6,)


def test_hook_tiahnm_register_miners() -> None:
    from tiahnm.training.loop import fit

    pm = fresh_manager((MinerPlugin(), "test-miners"))
    assert pm.get("miner")["counting"].package == "test-miners"
    miner = pm.get("miner").create("counting", key="miner.options", keep=3)
    assert isinstance(miner, Miner)
    bags = make_bags(4)
    head = pm.get("head").create("mean_pool", 8, 2, embed_dim=4)
    res = fit(
        head, bags, [], TrainConfig(epochs=2, progress=False), miner=miner, seed=1
    )
    assert miner.calls == {"fit_start": 1, "forward": 8, "after_step": 8}
    assert len(res.history) == 2


def test_hook_tiahnm_register_losses() -> None:
    pm = fresh_manager((LossPlugin(), "test-losses"))
    assert pm.get("loss")["norm"].plugin == "test-losses"
    loss = pm.get("loss").create("norm", key="losses[0].options", scale=2.0)
    assert isinstance(loss, BatchLoss)
    head = TinyHead(8)
    outs = [head(b.features) for b in make_bags(2)]
    value = loss(head, outs, [0, 1])
    # the registered factory got the option: 2 x the mean squared bag logit
    by_hand = 2.0 * sum(float(o.bag_logits.pow(2).mean()) for o in outs) / 2
    assert value.dim() == 0 and float(value) == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    assert head.classifier.weight.grad.abs().sum() > 0
    config = from_dict(
        {"losses": [{"name": "norm", "weight": 0.5, "options": {"scale": 3}}]}
    )
    assert (config.losses[0].name, config.losses[0].weight) == ("norm", 0.5)
    from_config = pm.get("loss").create(
        config.losses[0].name, key="losses[0].options", **config.losses[0].options
    )
    assert from_config.scale == 3
    assert float(from_config(head, outs, [0, 1])) == pytest.approx(1.5 * by_hand)


def test_hook_tiahnm_register_encoders() -> None:
    pm = fresh_manager((EncoderPlugin(), "test-encoders"))
    assert pm.get("encoder")["pool_encoder"].package == "test-encoders"
    encoder = pm.get("encoder").create("pool_encoder", key="encoder.options", out_dim=5)
    assert isinstance(encoder, nn.Module)
    x = torch.randn(2, 3, 16, 16)
    linear = encoder[2]
    assert linear.out_features == 5  # the option reached the factory
    by_hand = x.mean(dim=(2, 3)) @ linear.weight.T + linear.bias
    torch.testing.assert_close(encoder(x), by_hand)


def test_hook_tiahnm_register_bag_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiahnm.crossval import load_bags

    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    get_plugin_manager().register(BagSourcePlugin(), name="test-bag-sources")
    registry = get_registry("bag_source")
    assert registry["random_bags"].package == "test-bag-sources"
    source = registry.create("random_bags", key="data.options", n=5)
    assert isinstance(source, BagSource)
    # The configured source is found by name through the process-wide manager.
    config = from_dict(
        {"data": {"source": "random_bags", "options": {"n": 4, "dim": 6}}}
    )
    bags = load_bags(config)
    assert [b.slide_id for b in bags] == ["bag0", "bag1", "bag2", "bag3"]
    assert bags[0].features.shape == (5, 6)


def test_hook_tiahnm_register_callbacks(tmp_path: Path) -> None:
    from tiahnm.callbacks import Callback, build_callbacks

    class Rows(Callback):
        def __init__(self, keep: int = 1) -> None:
            self.keep, self.rows = keep, []

        def on_epoch_end(self, run, row):
            self.rows.append((run.fold, run.step, row["epoch"]))

    class CallbackPlugin:
        @hookimpl
        def tiahnm_register_callbacks(self, register):
            register("rows", Rows, description="test callback")

    get_plugin_manager().register(CallbackPlugin(), name="test-callbacks")
    entry = get_registry("callback")["rows"]
    assert (entry.plugin, entry.description) == ("test-callbacks", "test callback")
    config = from_dict({"callbacks": [{"name": "rows", "options": {"keep": 2}}]})
    runner = build_callbacks(config.callbacks, tmp_path)
    ((name, cb),) = runner.callbacks.values()
    assert (name, type(cb), cb.keep) == ("rows", Rows, 2)
    runner.run_start()
    runner.fold_start("r0_f0")
    for epoch in range(2):
        runner.epoch_end({"round": 0, "epoch": epoch})
    assert cb.rows == [("r0_f0", 0, 0), ("r0_f0", 1, 1)]
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.options\.kep"):
        build_callbacks(
            from_dict(
                {"callbacks": [{"name": "rows", "options": {"kep": 1}}]}
            ).callbacks,
            tmp_path,
        )


def test_hook_tiahnm_register_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = fresh_manager((CommandPlugin(), "test-commands"))
    group = click.Group("test")
    pm.pm.hook.tiahnm_register_commands(cli=group)
    result = CliRunner().invoke(group, ["hello-plugin", "--name", "tiahnm"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello tiahnm from a plugin\n"

    # The real command line picks the command up from the process-wide manager.
    from tiahnm.cli import cli

    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr(cli, "commands", dict(cli.commands))  # restored afterwards
    if hasattr(cli, "_plugins_loaded"):
        monkeypatch.setattr(cli, "_plugins_loaded", False)
    get_plugin_manager().register(CommandPlugin(), name="test-commands")
    result = CliRunner().invoke(cli, ["hello-plugin"])
    assert result.exit_code == 0, result.output
    assert "hello world from a plugin" in result.output


# ---------------------------------------------------------------------------------
# Registries.


def test_builtins_registered_with_package_tiahnm() -> None:
    pm = fresh_manager()
    for kind, names in BUILTINS.items():
        registry = pm.get(kind)
        assert names <= set(registry), f"{kind}: missing {names - set(registry)}"
        for name in registry:
            entry = registry[name]
            assert entry.plugin in DEFAULT_PLUGINS
            assert (entry.package, entry.version) == ("tiahnm", tiahnm.__version__)
            assert entry.kind == kind
            assert entry.description
    assert set(pm.registries) == set(KINDS)


def test_table_lists_every_component() -> None:
    pm = fresh_manager((HeadPlugin(), "test-heads"))
    rows = pm.table()
    assert {"name", "kind", "package", "version", "plugin", "description"} <= set(
        rows[0]
    )
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name["head", "abmil"]["package"] == "tiahnm"
    assert by_name["head", "tiny_head"]["package"] == "test-heads"
    assert len(rows) == sum(len(pm.get(kind)) for kind in KINDS)


def test_unknown_name_lists_registered_names() -> None:
    pm = fresh_manager()
    with pytest.raises(PluginError) as excinfo:
        pm.get("head")["no_such_head"]
    message = str(excinfo.value)
    assert "'no_such_head'" in message
    for name in pm.get("head"):
        assert name in message
    with pytest.raises(PluginError, match=r"Unknown miner 'nope'.*none"):
        pm.get("miner").create("nope")


def test_unknown_name_in_config_is_a_plugin_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tiahnm.crossval import build_miner

    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(
        PluginError, match=r"Unknown miner 'mhim_typo'\. Registered miners:"
    ):
        build_miner(from_dict({"miner": {"name": "mhim_typo"}}))


def test_unknown_kind() -> None:
    with pytest.raises(PluginError, match=r"Unknown plugin kind 'heads'.*head, miner"):
        fresh_manager().get("heads")


def test_duplicate_of_a_builtin_names_both_plugins() -> None:
    class Clash:
        @hookimpl
        def tiahnm_register_heads(self, register: hookspecs.Register) -> None:
            register("abmil", TinyHead)

    pm = fresh_manager((Clash(), "clashing-plugin"))
    # The clash is reported; only the clashing name is unusable, the rest works.
    assert "mean_pool" in pm.get("head")
    assert [f.package for f in pm.failures] == ["(duplicate)"]
    with pytest.raises(PluginError) as excinfo:
        pm.get("head")["abmil"]
    message = str(excinfo.value)
    assert "Duplicate head name 'abmil'" in message
    assert "'tiahnm.heads.plugin'" in message
    assert "'clashing-plugin'" in message


def test_duplicate_between_two_plugins_names_both() -> None:
    class First:
        @hookimpl
        def tiahnm_register_miners(self, register: hookspecs.Register) -> None:
            register("twin", CountingMiner)

    class Second:
        @hookimpl
        def tiahnm_register_miners(self, register: hookspecs.Register) -> None:
            register("twin", Miner)

    pm = fresh_manager((First(), "first-plugin"), (Second(), "second-plugin"))
    with pytest.raises(PluginError, match="Duplicate miner name 'twin'") as excinfo:
        pm.get("miner")["twin"]
    assert "'first-plugin'" in str(excinfo.value)
    assert "'second-plugin'" in str(excinfo.value)
    # Removing one of them resolves the clash.
    pm.unregister("second-plugin")
    assert pm.get("miner")["twin"].factory is CountingMiner


@pytest.mark.parametrize(
    ("name", "factory", "match"),
    [("", Miner, "empty name"), ("not_callable", 42, "is not callable")],
)
def test_bad_registration(name: str, factory: object, match: str) -> None:
    class Bad:
        @hookimpl
        def tiahnm_register_miners(self, register: hookspecs.Register) -> None:
            register(name, factory)

    pm = fresh_manager((Bad(), "bad-plugin"))
    assert "none" in pm.get("miner")  # the bad plugin does not stop the others
    (failure,) = pm.failures
    assert failure.name == "bad-plugin"
    assert match in failure.error


def test_register_and_unregister_rebuild_the_registries() -> None:
    pm = fresh_manager()
    assert "tiny_head" not in set(pm.get("head"))
    pm.register(HeadPlugin(), name="test-heads")
    assert "tiny_head" in set(pm.get("head"))
    pm.unregister("test-heads")
    assert "tiny_head" not in set(pm.get("head"))


def test_process_wide_manager_is_cached_and_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    first = get_plugin_manager()
    assert get_plugin_manager() is first
    assert get_registry("head") is first.get("head")
    reset_plugin_manager()
    assert get_plugin_manager() is not first


# ---------------------------------------------------------------------------------
# Option checking.


def test_create_rejects_unknown_option() -> None:
    registry = fresh_manager().get("head")
    with pytest.raises(ConfigError) as excinfo:
        registry.create("abmil", 8, 2, key="head.options", gated=True, atn_dim=64)
    message = str(excinfo.value)
    assert "head.options.atn_dim" in message
    accepted = message.split("Accepted options:")[1]
    for option in ("embed_dim", "attn_dim", "gated", "dropout", "act"):
        assert option in accepted
    # Positional arguments (in_dim, n_classes) are not options.
    assert "in_dim" not in accepted
    assert "n_classes" not in accepted


def test_create_default_key_and_no_options() -> None:
    registry = fresh_manager().get("miner")
    with pytest.raises(
        ConfigError, match=r"miner\.options\.ratio\. Accepted options: \(none\)"
    ):
        registry.create("none", ratio=0.1)


def test_create_accepts_anything_with_var_keyword() -> None:
    class Loose:
        @hookimpl
        def tiahnm_register_losses(self, register: hookspecs.Register) -> None:
            register("loose", lambda **options: options)

    registry = fresh_manager((Loose(), "loose-plugin")).get("loss")
    assert registry.create("loose", anything=1) == {"anything": 1}


def test_config_options_are_checked_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiahnm.crossval import build_head, build_losses

    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    config = from_dict({"head": {"name": "abmil", "options": {"hidden": 3}}})
    with pytest.raises(ConfigError, match=r"head\.options\.hidden"):
        build_head(config, 8, 2)
    config = from_dict({"losses": [{"name": "mirank", "options": {"bogus": 1}}]})
    with pytest.raises(ConfigError, match=r"losses\[0\]\.options\.bogus"):
        build_losses(config)


# ---------------------------------------------------------------------------------
# Entry points: real distributions on sys.path.

GOOD_MODULE = '''
"""A well-behaved third-party plugin."""

from tiahnm.hookspecs import hookimpl


@hookimpl
def tiahnm_register_miners(register):
    from tiahnm.miners.base import Miner

    register("fake_good_miner", Miner, description="from a fake distribution")
'''

CRASHING_MODULE = """
raise RuntimeError("boom at import")
"""


def write_distribution(
    site: Path, name: str, version: str, entry_points: dict[str, str]
) -> None:
    """A minimal installed distribution: ``<name>-<version>.dist-info``."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = ["[tiahnm]", *(f"{ep} = {target}" for ep, target in entry_points.items())]
    (dist_info / "entry_points.txt").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site folder with a good, a missing and a crashing ``tiahnm`` entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tiahnm_fake_good_plugin.py").write_text(textwrap.dedent(GOOD_MODULE))
    (site / "tiahnm_fake_crashing_plugin.py").write_text(CRASHING_MODULE)
    write_distribution(
        site, "tiahnm-fake-good", "1.2.3", {"fake_good": "tiahnm_fake_good_plugin"}
    )
    write_distribution(
        site,
        "tiahnm-fake-missing",
        "0.0.1",
        {"fake_missing": "tiahnm_fake_no_such_module"},
    )
    write_distribution(
        site,
        "tiahnm-fake-crashing",
        "0.0.2",
        {"fake_crashing": "tiahnm_fake_crashing_plugin"},
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("TIAHNM_LOAD_PLUGINS", raising=False)
    yield site
    for module in [m for m in sys.modules if m.startswith("tiahnm_fake_")]:
        del sys.modules[module]


def test_failing_entry_points_are_reported_and_others_load(
    fake_site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tiahnm.plugins"):
        pm = PluginManager()
    failures = {f.name: f for f in pm.failures}
    assert set(failures) >= {"fake_missing", "fake_crashing"}
    assert "fake_good" not in failures
    assert failures["fake_missing"].package == "tiahnm-fake-missing"
    assert "ModuleNotFoundError" in failures["fake_missing"].error
    assert "tiahnm_fake_no_such_module" in failures["fake_missing"].error
    assert failures["fake_crashing"].package == "tiahnm-fake-crashing"
    assert failures["fake_crashing"].error == "RuntimeError: boom at import"
    assert "'fake_missing'" in caplog.text
    assert "'fake_crashing'" in caplog.text
    # The good plugin loaded, with its distribution's name and version.
    entry = pm.get("miner")["fake_good_miner"]
    assert (entry.plugin, entry.package, entry.version) == (
        "fake_good",
        "tiahnm-fake-good",
        "1.2.3",
    )
    # Built-ins are unaffected.
    assert BUILTINS["head"] <= set(pm.get("head"))


def test_disable_plugin_autoload(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIAHNM_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = PluginManager()
    assert pm.failures == []
    assert "fake_good_miner" not in set(pm.get("miner"))
    assert "none" in set(pm.get("miner"))
    # An explicit argument wins over the environment.
    assert "fake_good_miner" in set(PluginManager(autoload=True).get("miner"))


def test_autoload_false_loads_no_entry_points(fake_site: Path) -> None:
    pm = PluginManager(autoload=False)
    assert pm.failures == []
    assert "fake_good_miner" not in set(pm.get("miner"))


@pytest.mark.parametrize(
    ("only", "loaded", "failed"),
    [
        ("fake_good", True, set()),
        (" fake_good , fake_missing ", True, {"fake_missing"}),
        ("fake_crashing", False, {"fake_crashing"}),
        ("no_such_plugin", False, set()),
    ],
)
def test_load_only_named_plugins(
    fake_site: Path,
    monkeypatch: pytest.MonkeyPatch,
    only: str,
    loaded: bool,
    failed: set[str],
) -> None:
    monkeypatch.setenv("TIAHNM_LOAD_PLUGINS", only)
    pm = PluginManager()
    assert {f.name for f in pm.failures} == failed
    assert ("fake_good_miner" in set(pm.get("miner"))) is loaded


# ---------------------------------------------------------------------------------
# The example plugin (plugins/tiahnm-topk-miner), registered from its source folder.
# tests/test_external_plugin.py installs it for real.


@pytest.fixture
def topk_manager(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    for module in [m for m in sys.modules if m.startswith("tiahnm_topk_miner")]:
        monkeypatch.delitem(sys.modules, module)
    import tiahnm_topk_miner.plugin

    return fresh_manager((tiahnm_topk_miner.plugin, "topk_miner"))


def test_example_plugin_registers_topk_and_topk_mean(
    topk_manager: PluginManager,
) -> None:
    from tiahnm_topk_miner import TopKMeanMIL, TopKMiner

    assert topk_manager.get("miner")["topk"].factory is TopKMiner
    assert topk_manager.get("head")["topk_mean"].factory is TopKMeanMIL
    with pytest.raises(
        ConfigError, match=r"miner\.options\.ratio\. Accepted options: "
    ):
        topk_manager.get("miner").create("topk", ratio=0.2)
    with pytest.raises(ConfigError, match=r"miner\.options\.p must be in \[0, 1\]"):
        topk_manager.get("miner").create("topk", p=1.5)
    with pytest.raises(ConfigError, match=r"head\.options\.k must be an integer >= 1"):
        topk_manager.get("head").create("topk_mean", 8, 2, k=0)


def test_example_head_pools_top_k_logits(topk_manager: PluginManager) -> None:
    head = topk_manager.get("head").create(
        "topk_mean", 8, 3, k=2, embed_dim=4, dropout=0.0
    )
    x = torch.randn(5, 8)
    out = head(x)
    logits = out.instance_logits
    assert logits.shape == (5, 3)
    expected = logits.sort(dim=0, descending=True).values[:2].mean(0, keepdim=True)
    torch.testing.assert_close(out.bag_logits, expected)
    # k is clipped to the bag size.
    one = head(x[:1])
    torch.testing.assert_close(one.bag_logits, one.instance_logits)
    assert head.instance_scores(out).shape == (5,)
    with pytest.raises(ValueError, match="does not give 'attention'"):
        head.instance_scores(out, "attention")


def _ctx(head: MILHead, seed: int = 0) -> FitContext:
    return FitContext(
        head=head,
        device=torch.device("cpu"),
        epochs=1,
        steps_per_epoch=1,
        generator=torch.Generator().manual_seed(seed),
    )


def test_example_miner_masks_the_top_scored_instances(
    topk_manager: PluginManager,
) -> None:
    miner = topk_manager.get("miner").create("topk", drop_ratio=0.3, p=1.0)
    miner.on_fit_start(_ctx(TinyHead(8)))
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.0, 0.5, 0.6])
    assert miner.keep_indices(scores).tolist() == [0, 2, 4, 6, 7, 8, 9]
    # p = 0 never masks; at least one instance is always kept.
    never = topk_manager.get("miner").create("topk", drop_ratio=0.5, p=0.0)
    assert never.keep_indices(scores).tolist() == list(range(10))
    greedy = topk_manager.get("miner").create(
        "topk", drop_ratio=0.9, p=1.0, random_ratio=0.9
    )
    for n in (2, 3, 10):
        assert greedy.keep_indices(torch.rand(n)).numel() == 1


def test_example_miner_is_deterministic_and_trains(topk_manager: PluginManager) -> None:
    def run(seed: int) -> list[list[int]]:
        miner = topk_manager.get("miner").create(
            "topk", drop_ratio=0.2, p=0.5, random_ratio=0.2
        )
        miner.on_fit_start(_ctx(TinyHead(8), seed))
        return [miner.keep_indices(torch.arange(10.0)).tolist() for _ in range(20)]

    assert run(0) == run(0)
    assert run(0) != run(1)

    torch.manual_seed(0)
    head = topk_manager.get("head").create("topk_mean", 8, 2, embed_dim=4)
    miner = topk_manager.get("miner").create("topk", drop_ratio=0.4, p=1.0)
    ctx = _ctx(head)
    miner.on_fit_start(ctx)
    head.train()
    out, extra = miner.forward(ctx, torch.randn(1, 10, 8), torch.tensor([1]), 0)
    assert extra == {}
    assert out.instance_logits.shape == (6, 2)
    assert head.training  # scoring ran in eval mode and restored the mode
    head.loss(out, torch.tensor([1])).backward()
    assert head.classifier.weight.grad is not None
    # The generator state is checkpointed and restored.
    miner = topk_manager.get("miner").create(
        "topk", drop_ratio=0.2, p=0.5, random_ratio=0.2
    )
    miner.on_fit_start(ctx)
    state = miner.state_dict()
    scores = torch.arange(10.0)
    before = [miner.keep_indices(scores).tolist() for _ in range(10)]
    miner.load_state_dict(state)
    assert [miner.keep_indices(scores).tolist() for _ in range(10)] == before


def test_registry_membership() -> None:
    registry = fresh_manager().get("head")
    assert "abmil" in registry
    assert "no_such_head" not in registry
    assert registry.get("no_such_head") is None


def test_plugin_with_unknown_hook_is_reported(fake_site: Path) -> None:
    (fake_site / "tiahnm_fake_typo_plugin.py").write_text(
        "from tiahnm.hookspecs import hookimpl\n\n\n"
        "@hookimpl\ndef tiahnm_register_head(register):\n    pass\n"
    )
    write_distribution(
        fake_site, "tiahnm-fake-typo", "0.1", {"fake_typo": "tiahnm_fake_typo_plugin"}
    )
    pm = PluginManager()
    failures = {f.name: f for f in pm.failures}
    assert "tiahnm_register_head" in failures["fake_typo"].error
    assert "fake_good_miner" in set(pm.get("miner"))


def test_register_rejects_misspelled_hook() -> None:
    class Typo:
        @hookimpl
        def tiahnm_register_minerz(self, register):
            pass

    pm = fresh_manager()
    with pytest.raises(PluginError, match="unknown hooks"):
        pm.register(Typo(), name="typo")
    assert pm.pm.get_plugin("typo") is None


class SquaredErrorTask:
    """A plugin task: squared error of the class-1 probability (binary labels)."""

    def __init__(self) -> None:
        from tiahnm.tasks.classification import BinaryTask

        class Squared(BinaryTask):
            name = "squared"
            calls = 0

            def criterion(self, logits, bags):
                Squared.calls += 1
                y = torch.tensor([float(b.label) for b in bags])
                return ((torch.softmax(logits, -1)[:, 1] - y) ** 2).mean()

        self.cls = Squared

    @hookimpl
    def tiahnm_register_tasks(self, register) -> None:
        register("squared", self.cls, description="test task")


def test_hook_tiahnm_register_tasks() -> None:
    from tiahnm.training.loop import fit

    plugin = SquaredErrorTask()
    pm = fresh_manager((plugin, "test-tasks"))
    assert {"binary", "multiclass", "survival", "squared"} <= set(pm.get("task"))
    assert pm.get("task")["survival"].package == "tiahnm"
    task = pm.get("task").create("squared", key="task.options")
    head = pm.get("head").create("mean_pool", 8, 2, embed_dim=4)
    res = fit(
        head, make_bags(4), [], TrainConfig(epochs=2, progress=False), task=task, seed=0
    )
    assert plugin.cls.calls == 8  # the loop's loss came from the task: 4 bags x 2
    assert len(res.history) == 2
