"""Exporters: torch to ONNX, ONNX Runtime optimization, TensorRT engines."""
