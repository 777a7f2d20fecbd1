"""Run exported bundles with numpy and onnxruntime only (import name pangu_runtime); never imports torch."""
