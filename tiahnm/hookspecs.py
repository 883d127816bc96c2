"""Hook specifications: the whole plugin API of tiahnm.

Every hook hands the plugin a ``register`` callback for one kind of component. Built-in
components register through these very hooks (see :mod:`tiahnm.plugins`), so the API is
exercised on every run. A third-party package exposes a module implementing any of these
hooks through the ``tiahnm`` entry-point group::

    [project.entry-points.tiahnm]
    my_miner = "my_package.plugin"

``register(name, factory, *, description="", options=None)`` adds ``factory`` under
``name``:

* heads: ``factory(in_dim: int, n_classes: int, **options) -> tiahnm.heads.MILHead``
* miners: ``factory(**options) -> tiahnm.miners.Miner``
* losses: ``factory(**options) -> tiahnm.losses.BatchLoss``
* encoders: ``factory(**options) -> torch.nn.Module`` giving ``[B, D]`` features
* bag sources: ``factory(**options) -> tiahnm.data.BagSource``
* callbacks: ``factory(**options) -> tiahnm.callbacks.Callback``
* tasks: ``factory(**options) -> tiahnm.tasks.Task``

``register(..., options=OptionsClass)`` declares the component's options as a typed
dataclass (:mod:`tiahnm.utils.options`): they are then validated (types, bounds,
choices), documented and defaulted from that class. Without it the factory's signature
describes the options: unknown and missing option names are reported against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

hookspec = pluggy.HookspecMarker("tiahnm")
hookimpl = pluggy.HookimplMarker("tiahnm")


class Register(Protocol):
    """The callback handed to every ``tiahnm_register_*`` hook."""

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        description: str = "",
        options: type | None = None,
    ) -> None:
        """Register ``factory`` under ``name`` (``options``: its options dataclass)."""


@hookspec
def tiahnm_register_heads(register: Register) -> None:
    """Register MIL heads (aggregators).

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes
            ``in_dim``, ``n_classes`` and keyword options and returns a
            :class:`tiahnm.heads.MILHead`.
    """


@hookspec
def tiahnm_register_miners(register: Register) -> None:
    """Register hard-instance miners.

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes keyword
            options and returns a :class:`tiahnm.miners.Miner`.
    """


@hookspec
def tiahnm_register_losses(register: Register) -> None:
    """Register extra training objectives (ranking, contrastive, consistency ...).

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes keyword
            options and returns a :class:`tiahnm.losses.BatchLoss`.
    """


@hookspec
def tiahnm_register_encoders(register: Register) -> None:
    """Register patch encoders (images to feature vectors).

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes keyword
            options and returns a ``torch.nn.Module`` mapping ``[B, 3, H, W]`` to
            ``[B, D]``.
    """


@hookspec
def tiahnm_register_bag_sources(register: Register) -> None:
    """Register bag sources (dataset readers).

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes keyword
            options and returns a :class:`tiahnm.data.BagSource`.
    """


@hookspec
def tiahnm_register_callbacks(register: Register) -> None:
    """Register callbacks (loggers) fed the events of a run.

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes
            keyword options and returns a :class:`tiahnm.callbacks.Callback`.
    """


@hookspec
def tiahnm_register_tasks(register: Register) -> None:
    """Register tasks (label semantics, loss, metrics: binary, survival ...).

    Args:
        register (Register): Call ``register(name, factory)``; the factory takes
            keyword options and returns a :class:`tiahnm.tasks.Task`.
    """


@hookspec
def tiahnm_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``tiahnm`` command-line group.

    Args:
        cli (click.Group): The top-level group; call ``cli.command()`` on it.
    """
