"""Export of pangu_fn models to ONNX and torch.export bundles (import name pangu_export)."""
