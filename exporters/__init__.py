"""gptdeploy.exporters: torch to ONNX, ONNX Runtime variants, TensorRT engines.

Installed as gptdeploy.exporters (the folder sits at the repository root). Exporters import only the
core (gptdeploy's own modules: the model, the export-folder format, ...), never gptdeploy.runtimes
nor gptdeploy.app; they write what they are asked to, and the application validates and commits it.
"""
