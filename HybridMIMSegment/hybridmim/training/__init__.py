"""Training segmentation models (fine-tuning) and what pre-training shares with it (schedule, run state)."""
