"""The projector's two refusals: a model it cannot compute exactly, and a self-check that failed."""


class UnsupportedModuleError(ValueError):
    """The projector cannot compute exact per-sample gradients here; the message names the module (its
    qualified name and class) or the parameter, and says why."""


class SelfCheckError(RuntimeError):
    """Per-sample features disagree with a full-batch backward (GradientProjector.check); the message
    names every disagreeing parameter."""
