"""Every error igengine reports to a user, in one place, with the exit status the CLI gives it.

Two kinds of errors:
  * ``InputError`` (a ValueError, exit status 2): the request or an input file is wrong; the
    message names the argument or the file and what would fix it.
  * ``RunError`` (a RuntimeError, exit status 1): a run could not be completed (disk full, NaN in
    the state, a missing runtime); work already written stays valid.
And one stop: ``Interrupted`` (a BaseException, like KeyboardInterrupt; exit status 128 + the
signal, 130 / 143): a run stopped by SIGINT or SIGTERM. Not an Exception, so that the
``except Exception`` of the libraries a run goes through (Dynamo, Inductor, the ONNX exporter,
igengine's own fallbacks) cannot take a user's Ctrl-C for a failure and carry on.

Library messages name arguments as `name` in backquotes (e.g. "`cfg_scale` must be ..."); only
``igengine.cli`` turns those names into its flags ("--cfg-scale").
"""

from __future__ import annotations


class IgengineError(Exception):
    """Base class of the errors igengine reports as one line (``exit_code`` is the CLI's status)."""

    exit_code = 1


class InputError(IgengineError, ValueError):
    """A request or an input that cannot be used as given."""

    exit_code = 2


class RunError(IgengineError, RuntimeError):
    """A run that could not be completed."""

    exit_code = 1


# -- inputs -------------------------------------------------------------------------------------


class ConfigError(InputError):
    """Settings that contradict each other or the model (unknown keys, a solver of another family, ...)."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class VAEError(CheckpointError):
    """A VAE or latent-statistics file that cannot be used; the message names the file and the fix."""


class JobError(InputError):
    """A job (sample, export, bench) that cannot be run as given."""


class ExportError(InputError):
    """An export request that cannot be carried out as given (bad value, unusable output folder, ...)."""


class GraphMismatchError(ExportError):
    """An exported graph or engine was made for another checkpoint, model config, precision or device."""


class MetricsError(InputError):
    """Input that the metrics cannot use (a file, a member, a shape, a weights file); names the file and the fix."""


class EvaluateError(InputError):
    """Bad input to `igengine evaluate`: one line naming the file or argument and what would fix it."""


class PrecisionMismatchError(ConfigError):
    """A network built for one precision driven by a sampler of another."""


class BackendError(IgengineError, RuntimeError):
    """A backend cannot be built or called as asked (unknown name, batch above its maximum, ...)."""

    exit_code = 2


class BackendUnavailable(BackendError):
    """A backend's runtime (ONNX Runtime, TensorRT, a CUDA GPU) is missing here; the message says what to install."""

    exit_code = 1


# -- runs ---------------------------------------------------------------------------------------


class OutputError(RunError):
    """The output folder cannot be used or written; the message says why and what to do."""


class PackError(OutputError):
    """The chunks cannot be assembled (missing, malformed or corrupt); the message says which."""


class Interrupted(BaseException):
    """A run stopped by a signal (SIGINT, SIGTERM): exit status 128 + the signal number (130, 143).

    The message says where the run stands (what is complete) and how to resume.

    A BaseException, not an Exception (and not an IgengineError), for the reason asyncio's
    CancelledError is one: a stop must go through every ``except Exception`` between the signal
    handler and the command (torch.compile wraps any Exception of a compile in its own
    InductorError / BackendCompilerFailed, the ONNX exporter and its op registry log and go on,
    a fallback takes a failing fast path for a broken one). Not a KeyboardInterrupt either: the
    command-line frameworks turn that into their own "Aborted!" / exit 130, losing the message and
    SIGTERM's 143. ``interruption(e)`` finds one behind a library's wrapper.
    """

    exit_code = 130

    def __init__(self, signum: int, message: str | None = None):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        try:
            self.signal_name = signal.Signals(self.signum).name
        except ValueError:
            self.signal_name = f"signal {self.signum}"
        super().__init__(message or f"interrupted by {self.signal_name}")


def interruption(e: BaseException | None) -> BaseException | None:
    """The stop (``Interrupted`` or KeyboardInterrupt) that ``e`` is or that caused it, else None.

    Follows ``__cause__`` and ``__context__`` (a library that wraps every exception of a step, or
    cleanup code that failed while a stop went by), so that no wrapper makes an interrupt look like
    a failure to fall back from.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            return e
        seen.add(id(e))
        e = e.__cause__ if e.__cause__ is not None else e.__context__
    return None


class SamplingError(RunError):
    """A batch that no loop of the sampler's ladder could compute; the message names each loop tried and its error."""


class NetworkReplaced(RunError):
    """Raised by a network that has just replaced its implementation by an equivalent, slower one (a
    compiled backend that failed, now the eager backend of the same precision) in the middle of a
    call: the batch in flight must be computed again, which ``igengine.sampling.Sampler`` does.

    source / target: the implementations (e.g. 'compiled', 'torch'); cause: the failure, one line;
    starts_there: what starts a run on the target (e.g. "`backend` torch").
    """

    def __init__(self, source: str, target: str, cause: str, starts_there: str | None = None):
        self.source, self.target, self.cause, self.starts_there = source, target, cause, starts_there
        super().__init__(f"the {source} network failed ({cause}) and was replaced by the {target} network: "
                         "compute the batch again")


class NonFiniteError(RunError):
    """NaN or Inf appeared in the sampler state; names the first bad step and the sample indices."""

    def __init__(self, step: int, indices: list[int]):
        self.step = step
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        super().__init__(f"NaN/Inf in the latents at solver step {step} for sample indices [{shown}]")


__all__ = [
    "BackendError", "BackendUnavailable", "CheckpointError", "ConfigError", "EvaluateError", "ExportError",
    "GraphMismatchError", "IgengineError", "InputError", "Interrupted", "JobError", "MetricsError", "NetworkReplaced",
    "NonFiniteError", "OutputError", "PackError", "interruption",
    "PrecisionMismatchError", "RunError", "SamplingError", "VAEError",
]
