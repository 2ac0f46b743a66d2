"""The errors a user can cause. The CLI prints any ``UserError`` as one line and exits with code 2.

They live at the bottom of the package so that every layer raises them without importing the
layers above it, and so that the CLI can catch them without importing torch (``--help`` stays fast).
"""


class UserError(Exception):
    """A mistake in what the user gave (a recipe, a flag, a file, a model); the message names it."""


class RecipeError(UserError, ValueError):
    """A user error in a recipe or its overrides; the message names the key or file."""


class DataError(RecipeError):
    """Data that cannot be found or read; the message says where to put it or what is wrong."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class ExportError(UserError, ValueError):
    """A model or module the exporter cannot turn into an integer graph; the message names it."""


class ValidationError(UserError, ValueError):
    """A model file that cannot be validated (missing, unreadable, rejected by a runtime)."""


class KernelBuildError(UserError, RuntimeError):
    """A kernel this platform cannot build (torch.compile with no C++ compiler); the message says how to
    run without it."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss under nan_policy: stop); the message says where.
    Not a user error: the CLI exits with code 1."""
