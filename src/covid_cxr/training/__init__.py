"""Training loop, augmentation and distributed training."""
