"""gptdeploy: take a GPT from PyTorch to ONNX, ONNX Runtime and TensorRT, and prove every runtime computes the same model."""

__version__ = "0.1.0"

from gptdeploy.errors import GptDeployError
from gptdeploy.loading import LoadedModel, load
from gptdeploy.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "GptDeployError", "LoadedModel", "load", "__version__"]
