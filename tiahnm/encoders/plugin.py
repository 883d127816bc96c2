"""Built-in encoders, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_encoders(register: Register) -> None:
    """Register the built-in encoders."""
    from tiahnm.encoders.small_cnn import SmallCNN

    register(
        "small_cnn", SmallCNN, description="Small 3-block CNN, trainable end to end"
    )
