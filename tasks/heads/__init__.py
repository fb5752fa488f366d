"""Task heads: detection and segmentation modules that sit on a timm backbone (torchvision detectors, FPN)."""
