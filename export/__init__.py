"""Turn SR-ViT checkpoints into checked ONNX graphs, TensorRT engines and a Triton model repository."""
