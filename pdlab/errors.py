"""User-facing errors.

Every mistake a user can make (a bad YAML key, an unknown model, an invalid
sampling parameter, a prompt too long) raises a subclass of `PdlabError` with a
message that names the problem. Entry points catch `PdlabError` and print the
message instead of a traceback; the HTTP server maps it to a 4xx body.
"""


class PdlabError(Exception):
    """Base class of the errors whose message is meant for the user."""


class ConfigError(PdlabError):
    """A configuration file or flag is malformed or names an unknown key."""


class ModelNotFoundError(PdlabError):
    """A model name is neither a preset, a local directory nor a GGUF file."""


class InvalidRequestError(PdlabError):
    """A request cannot be served as given (sampling parameters, prompt length)."""
