"""Hierarchical backbones assembled from ``blocks``, registered with timm on import."""

from . import attention_resnets, biformer, composed, conv_attention_hybrid, dual_attention_vit, mobilenetv2_ca  # noqa: F401  (importing registers their models)
