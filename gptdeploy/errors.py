"""The errors gptdeploy raises on purpose, and the exit codes the command line gives them.

    0   done; parity and bench: every check passed, every available runtime measured
    1   a comparison failed (parity, verify) or a runtime failed while it ran (RuntimeFailed)
    2   bad input or environment (GptDeployError): an unknown model, a corrupt or tampered file, a bad
        option, a missing runtime or GPU, an unwritable destination
    70  an unexpected internal error (a bug): one line, and GPTDEPLOY_DEBUG=1 shows the traceback
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM): both print "gptdeploy: interrupted"
"""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 70


class GptDeployError(Exception):
    """Bad input or environment: the message says what is wrong and, where possible, what to do (exit 2)."""


class RuntimeFailed(Exception):
    """A runtime failed while it ran on valid inputs (exit 1): the message names the runtime and what failed."""


class EngineUnusable(GptDeployError):
    """A TensorRT engine that is missing or cannot be loaded: `engine` names it (prefill or decode), so that
    it can be rebuilt alone."""

    def __init__(self, engine: str, message: str):
        super().__init__(message)
        self.engine = engine


class WeightsUnavailable(GptDeployError):
    """A preset's trained weights are neither in the local Hugging Face cache nor downloadable now."""
