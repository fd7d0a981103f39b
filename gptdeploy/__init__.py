"""gptdeploy: take a GPT from PyTorch to ONNX, ONNX Runtime and TensorRT, and prove every runtime computes the same model.

Importing the package does not import torch: an app that runs an exported model needs only
onnxruntime, numpy and tiktoken. `load`, `GPT` and `GPTConfig` import it on first use.
"""

__version__ = "0.1.0"

from gptdeploy.errors import GptDeployError

_LAZY = {"load": "gptdeploy.loading", "LoadedModel": "gptdeploy.loading", "GPT": "gptdeploy.model",
         "GPTConfig": "gptdeploy.model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptdeploy' has no attribute {name!r}")


__all__ = ["GPT", "GPTConfig", "GptDeployError", "LoadedModel", "load", "__version__"]
