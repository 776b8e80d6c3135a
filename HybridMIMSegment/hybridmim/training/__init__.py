"""Training: supervised segmentation now; the pre-training methods build on it."""
