"""LightningModules: classification (and, as they land, detection and segmentation), with their heads."""
