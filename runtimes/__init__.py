"""gptdeploy.runtimes: one Runner interface over torch, transformers, ONNX Runtime and TensorRT.

Installed as gptdeploy.runtimes (the folder sits at the repository root). Runtimes import only the
core, never gptdeploy.exporters nor gptdeploy.app: a runner opens what already exists.
"""
