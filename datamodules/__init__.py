"""LightningDataModules for ImageNet, COCO and ADE20K, their transforms, and the synthetic demo data."""
