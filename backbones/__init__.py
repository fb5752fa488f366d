"""Hierarchical backbones assembled from ``blocks``, registered with timm on import."""
