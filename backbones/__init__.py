"""Hierarchical backbones assembled from ``blocks``, registered with timm on import."""

from . import (  # noqa: F401  (importing registers their models)
    attention_resnets,
    biformer,
    composed,
    composed_resnet,
    conv_attention_hybrid,
    dual_attention_vit,
    mobilenetv2_ca,
)
