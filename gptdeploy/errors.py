"""The errors gptdeploy raises on purpose: the CLI prints their message as one line and exits 2."""


class GptDeployError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""


class EngineUnusable(GptDeployError):
    """A TensorRT engine that is missing or cannot be loaded: `engine` names it (prefill or decode), so that
    it can be rebuilt alone."""

    def __init__(self, engine: str, message: str):
        super().__init__(message)
        self.engine = engine


class WeightsUnavailable(GptDeployError):
    """A preset's trained weights are neither in the local Hugging Face cache nor downloadable now."""
