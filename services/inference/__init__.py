"""skyfuse inference: the fused ONNX model behind HTTP in each cloud (onnxruntime and numpy only)."""
