"""Self-supervised pre-training: methods (HybridMIM), their data and the shared trainer."""
