"""The built-in encoder presets (see docs/encoders.md for the sources of each figure).

Architectures and keyword arguments follow how the authors' model cards and
TRIDENT/STAMP/slide2vec build each model; they are data here, resolved by
:mod:`tiahnm.encoders.preset_archs`.
"""

from __future__ import annotations

from tiahnm.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from tiahnm.encoders.presets import EncoderPreset

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

HF = "https://huggingface.co/"
CC_NC_ND = "CC-BY-NC-ND-4.0"
SEE_CARD = "see model card"

IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_SWIGLU = {"mlp_layer": "layer:SwiGLUPacked", "act_layer": "layer:SiLU"}
_VIRCHOW = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    **_SWIGLU,
}
_HOPTIMUS = {
    "img_size": 224,
    "num_classes": 0,
    "global_pool": "token",
    "init_values": 1e-5,
    "dynamic_img_size": True,
}


def _timm_vit(
    name: str, title: str, arch: str, kwargs: dict, **card: object
) -> EncoderPreset:
    return EncoderPreset(
        name=name, title=title, builder="timm", arch=arch, kwargs=kwargs, **card
    )  # type: ignore[arg-type]


def _kaiko(
    size: str, arch: str, dim: int, n_params: int, img: int = 224
) -> EncoderPreset:
    return _timm_vit(
        f"kaiko_{size}",
        f"kaiko.ai {size.upper()} (towards large pathology FMs)",
        arch,
        {"img_size": img, "num_classes": 0, "dynamic_img_size": True},
        pooling="cls",
        out_dim=dim,
        mean=HALF,
        std=HALF,
        resize_size=224,
        crop_size=224,
        interpolation="bilinear",
        mpp=0.5,
        patch_px=224,
        weight_files=("model.safetensors", "pytorch_model.bin"),
        hf_repo=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
        source_url=f"{HF}1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
        licence=SEE_CARD,
        gated=False,
        n_params=n_params,
        params_note="timm architecture size (kaiko.ai paper, Aben et al. 2024)",
    )


def _ctranspath(
    name: str, title: str, file: str, licence: str, url: str
) -> EncoderPreset:
    return EncoderPreset(
        name=name,
        title=title,
        builder="ctranspath",
        arch="swin_tiny_patch4_window7_224",
        kwargs={"img_size": 224, "num_classes": 0},
        pooling="avg",
        out_dim=768,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_size=224,
        crop_size=None,
        interpolation="bilinear",
        mpp=1.0,
        patch_px=224,
        weight_files=(file,),
        hf_repo="",
        source_url=url,
        licence=licence,
        gated=False,
        n_params=27_500_000,
        params_note="28M (27.5M) in the CTransPath paper (Wang et al. 2022, MedIA)",
        ignore_prefixes=("head",),
        drop_keys=r"attn_mask$",
        key_filter="timm_swin",
        notes="checkpoint {'model': state dict} in the timm 0.5 Swin layout "
        "(downsample at the end of a stage, attn_mask buffers): remapped with "
        "timm's Swin checkpoint filter.",
    )


def _hf_vit(
    name: str, title: str, arch: str, config: dict, **card: object
) -> EncoderPreset:
    return EncoderPreset(
        name=name, title=title, builder="transformers", arch=arch, kwargs=config, **card
    )  # type: ignore[arg-type]


def _dinov2(hidden: int, layers: int, heads: int, patch: int, **extra: object) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "patch_size": patch,
        "image_size": 224,
        "mlp_ratio": 4,
        "layerscale_value": 1e-5,
        "layer_norm_eps": 1e-6,
        **extra,
    }


def _clam_and_uni() -> list[EncoderPreset]:
    """CLAM's truncated ResNet-50, UNI and UNI2-h (Mahmood lab)."""
    return [
        EncoderPreset(
            name="resnet50_trunc",
            title="CLAM ResNet-50 truncated after layer 3 (ImageNet)",
            builder="resnet50_trunc",
            arch="resnet50",
            kwargs={},
            pooling="avg",
            out_dim=1024,
            **IMAGENET,
            resize_size=None,
            crop_size=None,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=256,
            weight_files=(
                "resnet50-19c8e357.pth",
                "resnet50-0676ba61.pth",
                "resnet50-11ad3fa6.pth",
            ),
            hf_repo="",
            source_url="https://download.pytorch.org/models/ (torchvision ResNet-50 ImageNet weights)",
            licence="BSD-3-Clause (torchvision)",
            gated=False,
            n_params=8_543_296,
            params_note="torchvision ResNet-50 conv1..layer3 (CLAM, Lu et al. 2021, "
            "resnet_custom.py; no count published, the layers are)",
            ignore_prefixes=("layer4", "fc"),
            notes="CLAM feeds 256 px patches at 20x without resizing.",
        ),
        _timm_vit(
            "uni",
            "UNI (ViT-L/16)",
            "vit_large_patch16_224",
            {
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            pooling="cls",
            out_dim=1024,
            **IMAGENET,
            resize_size=224,
            crop_size=224,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin",),
            hf_repo="MahmoodLab/UNI",
            source_url=f"{HF}MahmoodLab/UNI",
            licence=CC_NC_ND,
            gated=True,
            n_params=303_000_000,
            params_note="303M (UNI model card / Chen et al. 2024, Nat. Med.)",
        ),
        _timm_vit(
            "uni2_h",
            "UNI2-h (ViT-H/14, 8 registers)",
            "vit_giant_patch14_224",
            {
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                **_SWIGLU,
            },
            pooling="cls",
            out_dim=1536,
            **IMAGENET,
            resize_size=224,
            crop_size=224,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin",),
            hf_repo="MahmoodLab/UNI2-h",
            source_url=f"{HF}MahmoodLab/UNI2-h",
            licence=CC_NC_ND,
            gated=True,
            n_params=681_000_000,
            params_note="681M (UNI2-h model card)",
        ),
    ]


def _conch() -> list[EncoderPreset]:
    """CONCH v1 (its own package) and v1.5 (built from timm)."""
    return [
        EncoderPreset(
            name="conch_v1",
            title="CONCH v1 (ViT-B/16 image encoder, CoCa)",
            builder="conch",
            arch="conch_ViT-B-16",
            kwargs={},
            pooling="encode_image",
            out_dim=512,
            mean=OPENAI_MEAN,
            std=OPENAI_STD,
            resize_size=448,
            crop_size=448,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=448,
            weight_files=("pytorch_model.bin",),
            hf_repo="MahmoodLab/CONCH",
            source_url=f"{HF}MahmoodLab/CONCH",
            licence=CC_NC_ND,
            gated=True,
            n_params=90_000_000,
            params_note="90M image encoder (Lu et al. 2024, Nat. Med.); the CoCa "
            "visual tower is counted (the checkpoint also holds the text tower)",
            count_module="visual",
            requires="pip install git+https://github.com/Mahmoodlab/CONCH.git",
            notes="encode_image(proj_contrast=False, normalize=False), as TRIDENT.",
        ),
        EncoderPreset(
            name="conch_v15",
            title="CONCH v1.5 (ViT-L/16 vision tower of TITAN)",
            builder="conch_v15",
            arch="vit_large_patch16_224",
            kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1.0,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            pooling="encode_image",
            out_dim=768,
            **IMAGENET,
            resize_size=448,
            crop_size=448,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=448,
            weight_files=("pytorch_model_vision.bin",),
            hf_repo="MahmoodLab/conchv1_5",
            source_url=f"{HF}MahmoodLab/conchv1_5",
            licence=CC_NC_ND,
            gated=True,
            n_params=304_000_000,
            params_note="ViT-L/16 trunk, 304M (TITAN, Ding et al. 2024: CONCH v1.5 "
            "is a ViT-L/16), plus a 2.8M attentional pooler; no single published "
            "count",
            key_filter="trunk_pos_embed",
            notes="built from timm as TRIDENT's CONCHVisionTower: the 224 px "
            "position grid is interpolated to 448 px DINO-style at run time.",
        ),
    ]


def _virchow_and_hoptimus() -> list[EncoderPreset]:
    """Virchow, Virchow2 (Paige) and H-optimus-0/1 (Bioptimus)."""
    return [
        _timm_vit(
            "virchow",
            "Virchow (ViT-H/14)",
            "vit_huge_patch14_224",
            _VIRCHOW,
            pooling="cls+mean",
            out_dim=2560,
            **IMAGENET,
            resize_size=224,
            crop_size=None,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin", "model.safetensors"),
            hf_repo="paige-ai/Virchow",
            source_url=f"{HF}paige-ai/Virchow",
            licence="Apache-2.0 (with access agreement)",
            gated=True,
            n_params=632_000_000,
            params_note="632M (Vorontsov et al. 2024, Nat. Med.)",
        ),
        _timm_vit(
            "virchow2",
            "Virchow2 (ViT-H/14, 4 registers)",
            "vit_huge_patch14_224",
            {**_VIRCHOW, "reg_tokens": 4},
            pooling="cls+mean",
            out_dim=2560,
            **IMAGENET,
            resize_size=224,
            crop_size=None,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin", "model.safetensors"),
            hf_repo="paige-ai/Virchow2",
            source_url=f"{HF}paige-ai/Virchow2",
            licence=CC_NC_ND,
            gated=True,
            n_params=632_000_000,
            params_note="632M (Zimmermann et al. 2024, Virchow2 paper)",
        ),
        _timm_vit(
            "h_optimus_0",
            "H-optimus-0 (ViT-g/14, 4 registers)",
            "vit_giant_patch14_reg4_dinov2",
            _HOPTIMUS,
            pooling="cls",
            out_dim=1536,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            resize_size=224,
            crop_size=None,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin", "model.safetensors"),
            hf_repo="bioptimus/H-optimus-0",
            source_url=f"{HF}bioptimus/H-optimus-0",
            licence="Apache-2.0",
            gated=True,
            n_params=1_100_000_000,
            params_note="1.1B (H-optimus-0 model card)",
        ),
        _timm_vit(
            "h_optimus_1",
            "H-optimus-1 (ViT-g/14, 4 registers)",
            "vit_giant_patch14_reg4_dinov2",
            _HOPTIMUS,
            pooling="cls",
            out_dim=1536,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            resize_size=224,
            crop_size=None,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("pytorch_model.bin", "model.safetensors"),
            hf_repo="bioptimus/H-optimus-1",
            source_url=f"{HF}bioptimus/H-optimus-1",
            licence=SEE_CARD,
            gated=True,
            n_params=1_100_000_000,
            params_note="1.1B (H-optimus-1 model card)",
        ),
    ]


def _h0_and_gigapath() -> list[EncoderPreset]:
    """H0-mini (Bioptimus) and Prov-GigaPath."""
    return [
        _timm_vit(
            "h0_mini",
            "H0-mini (ViT-B/14, 4 registers, distilled from H-optimus-0)",
            "vit_base_patch14_reg4_dinov2",
            {
                "img_size": 224,
                "num_classes": 0,
                "dynamic_img_size": True,
                "init_values": 1e-5,
                "mlp_ratio": 2.66667 * 2,
                **_SWIGLU,
            },
            pooling="cls",
            out_dim=768,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            resize_size=224,
            crop_size=224,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors", "pytorch_model.bin"),
            hf_repo="bioptimus/H0-mini",
            source_url=f"{HF}bioptimus/H0-mini",
            licence=CC_NC_ND,
            gated=True,
            n_params=86_000_000,
            params_note="86M (ViT-B, Filiot et al. 2025); mlp_ratio 16/3 is what "
            "gives a SwiGLU ViT-B this count (the hub config was not readable here)",
        ),
        _timm_vit(
            "gigapath",
            "Prov-GigaPath tile encoder (ViT-g/16)",
            "vit_giant_patch14_dinov2",
            {
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            pooling="cls",
            out_dim=1536,
            **IMAGENET,
            resize_size=256,
            crop_size=224,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=256,
            weight_files=("pytorch_model.bin",),
            hf_repo="prov-gigapath/prov-gigapath",
            source_url=f"{HF}prov-gigapath/prov-gigapath",
            licence="Apache-2.0",
            gated=True,
            n_params=1_134_000_000,
            params_note="1.13B tile encoder (Xu et al. 2024, Nature)",
        ),
    ]


def _phikon() -> list[EncoderPreset]:
    """Phikon and Phikon-v2 (Owkin)."""
    return [
        _hf_vit(
            "phikon",
            "Phikon (ViT-B/16, iBOT)",
            "ViTModel",
            {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "patch_size": 16,
                "image_size": 224,
                "qkv_bias": True,
                "layer_norm_eps": 1e-12,
            },
            pooling="cls",
            out_dim=768,
            **IMAGENET,
            resize_size=224,
            crop_size=None,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors", "pytorch_model.bin"),
            hf_repo="owkin/phikon",
            source_url=f"{HF}owkin/phikon",
            licence=SEE_CARD,
            gated=False,
            n_params=86_000_000,
            params_note="86M ViT-B (Filiot et al. 2023)",
            ignore_prefixes=("pooler",),
        ),
        _hf_vit(
            "phikon_v2",
            "Phikon-v2 (ViT-L/16, DINOv2)",
            "Dinov2Model",
            _dinov2(1024, 24, 16, 16),
            pooling="cls",
            out_dim=1024,
            **IMAGENET,
            resize_size=224,
            crop_size=224,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors",),
            hf_repo="owkin/phikon-v2",
            source_url=f"{HF}owkin/phikon-v2",
            licence=SEE_CARD,
            gated=False,
            n_params=300_000_000,
            params_note="300M ViT-L (Filiot et al. 2024, Phikon-v2)",
        ),
    ]


def _ctranspath_hibou() -> list[EncoderPreset]:
    """CTransPath / CHIEF and Hibou-B/L."""
    return [
        _ctranspath(
            "ctranspath",
            "CTransPath (Swin-T + ConvStem)",
            "ctranspath.pth",
            "GPL-3.0",
            "https://github.com/Xiyue-Wang/TransPath",
        ),
        _ctranspath(
            "chief_ctranspath",
            "CHIEF patch encoder (CTransPath architecture)",
            "CHIEF_CTransPath.pth",
            "AGPL-3.0",
            "https://github.com/hms-dbmi/CHIEF",
        ),
        _hf_vit(
            "hibou_b",
            "Hibou-B (ViT-B/14, 4 registers)",
            "Dinov2WithRegistersModel",
            _dinov2(768, 12, 12, 14, num_register_tokens=4),
            pooling="pooler",
            out_dim=768,
            mean=HIBOU_MEAN,
            std=HIBOU_STD,
            resize_size=224,
            crop_size=None,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors",),
            hf_repo="histai/hibou-b",
            source_url=f"{HF}histai/hibou-b",
            licence="Apache-2.0",
            gated=False,
            n_params=86_000_000,
            params_note="86M (Nechaev et al. 2024, Hibou)",
        ),
        _hf_vit(
            "hibou_l",
            "Hibou-L (ViT-L/14, 4 registers)",
            "Dinov2WithRegistersModel",
            _dinov2(1024, 24, 16, 14, num_register_tokens=4),
            pooling="pooler",
            out_dim=1024,
            mean=HIBOU_MEAN,
            std=HIBOU_STD,
            resize_size=224,
            crop_size=None,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors",),
            hf_repo="histai/hibou-L",
            source_url=f"{HF}histai/hibou-L",
            licence="Apache-2.0",
            gated=False,
            n_params=304_000_000,
            params_note="304M (Nechaev et al. 2024, Hibou)",
        ),
    ]


def _kaiko_lunit_midnight() -> list[EncoderPreset]:
    """The kaiko.ai ViTs, Lunit's ViT-S/8 and Midnight-12k."""
    return [
        _kaiko("vits16", "vit_small_patch16_224", 384, 22_000_000),
        _kaiko("vits8", "vit_small_patch8_224", 384, 22_000_000),
        _kaiko("vitb16", "vit_base_patch16_224", 768, 86_000_000),
        _kaiko("vitb8", "vit_base_patch8_224", 768, 86_000_000),
        _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 304_000_000, img=518),
        _timm_vit(
            "lunit_vits8",
            "Lunit DINO ViT-S/8",
            "vit_small_patch8_224",
            {"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
            pooling="cls",
            out_dim=384,
            mean=LUNIT_MEAN,
            std=LUNIT_STD,
            resize_size=224,
            crop_size=224,
            interpolation="bicubic",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors", "pytorch_model.bin"),
            hf_repo="1aurent/vit_small_patch8_224.lunit_dino",
            source_url=f"{HF}1aurent/vit_small_patch8_224.lunit_dino",
            licence=SEE_CARD,
            gated=False,
            n_params=21_700_000,
            params_note="21.7M ViT-S (Kang et al. 2023, CVPR)",
        ),
        _hf_vit(
            "midnight_12k",
            "Midnight-12k (ViT-g/14, DINOv2)",
            "Dinov2Model",
            _dinov2(1536, 40, 24, 14, use_swiglu_ffn=True),
            pooling="cls+mean",
            out_dim=3072,
            mean=HALF,
            std=HALF,
            resize_size=224,
            crop_size=224,
            interpolation="bilinear",
            mpp=0.5,
            patch_px=224,
            weight_files=("model.safetensors",),
            hf_repo="kaiko-ai/midnight",
            source_url=f"{HF}kaiko-ai/midnight",
            licence="MIT",
            gated=False,
            n_params=1_100_000_000,
            params_note="1.1B ViT-g/14 (Karasikov et al. 2025, Midnight)",
        ),
    ]


def builtin_presets() -> list[EncoderPreset]:
    """Every built-in preset."""
    families = (
        _clam_and_uni,
        _conch,
        _virchow_and_hoptimus,
        _h0_and_gigapath,
        _phikon,
        _ctranspath_hibou,
        _kaiko_lunit_midnight,
    )
    return [preset for family in families for preset in family()]
