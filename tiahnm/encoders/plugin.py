"""Built-in encoders, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_encoders(register: Register) -> None:
    """Register the built-in encoders."""
    from tiahnm.encoders.module_encoder import module_encoder
    from tiahnm.encoders.small_cnn import SmallCNN
    from tiahnm.encoders.timm_encoder import timm_encoder
    from tiahnm.encoders.torchvision_encoder import torchvision_encoder

    register(
        "small_cnn", SmallCNN, description="Small 3-block CNN, trainable end to end"
    )
    register(
        "torchvision",
        torchvision_encoder,
        description="torchvision.models backbone (torchvision:ARCH), head removed, "
        "local weights",
    )
    register(
        "timm",
        timm_encoder,
        description="timm model (timm:NAME), num_classes=0, local weights",
    )
    register(
        "module",
        module_encoder,
        description="Any nn.Module by import path (module:pkg.mod:Class)",
    )
    # Named presets: the preset object is the factory (see tiahnm.encoders.presets).
    from tiahnm.encoders.builtin_presets import builtin_presets

    for preset in builtin_presets():
        register(preset.name, preset, description=f"preset: {preset.title}")
