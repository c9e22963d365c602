"""Named errors of minipatch (MATH.md section 7)."""


class MinipatchError(Exception):
    """Base class of every error minipatch raises on purpose."""


class ShapeError(MinipatchError, ValueError):
    """An array has the wrong shape, dtype or rank for the call."""


class InputError(MinipatchError, ValueError):
    """Bad tokens, positions or context sets (empty, out of range, duplicated)."""


class NotControllableError(MinipatchError, ValueError):
    """A witness does not exist: a construction would divide by zero (MATH.md section 7).

    Attributes name the layer, the token position, the quantity and its value, so a
    reader can find the culprit: e.g. ``layer=3, position=17, quantity='||n||^2', value=0.0``.
    """

    def __init__(self, quantity, value, *, layer=None, position=None, hint=""):
        self.quantity = quantity
        self.value = value
        self.layer = layer
        self.position = position
        self.hint = hint
        where = []
        if layer is not None:
            where.append(f"layer {layer}")
        if position is not None:
            where.append(f"token position {position}")
        msg = f"no witness: {quantity} = {value!r}"
        if where:
            msg += " at " + ", ".join(where)
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelFileError(MinipatchError, ValueError):
    """A checkpoint file is truncated, malformed, lying about its contents or unsupported."""


class UnsupportedArchitectureError(ModelFileError):
    """The checkpoint names an architecture minipatch does not implement."""


class ConfigError(ModelFileError):
    """A configuration field is missing, mistyped or out of range.

    Attributes: ``source`` (the file or object the config came from, or None), ``field``
    and ``value``, so the message names exactly what to fix.
    """

    def __init__(self, field, value, reason, *, source=None):
        self.field = field
        self.value = value
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field {field!r} = {value!r}: {reason}")


class MethodError(InputError):
    """A construction name (``method=``) that the block family does not have.

    Attributes: ``method`` (what was asked), ``family`` and ``allowed`` (the names that
    family accepts).
    """

    def __init__(self, method, family, allowed):
        self.method = method
        self.family = family
        self.allowed = tuple(allowed)
        super().__init__(f"method {method!r} is not a construction of the {family!r} block; "
                         f"one of {', '.join(repr(a) for a in self.allowed)}")


class NonFiniteError(MinipatchError, ValueError):
    """A stream, hidden, patch or parameter holds NaN or inf (or overflowed).

    Attributes name where: ``quantity``, ``layer``, ``sublayer``, ``position`` (the kept
    token's original position) and ``value``; ``hint`` says what to try (e.g. float64).
    """

    def __init__(self, quantity, *, layer=None, sublayer=None, position=None, value=None, hint=""):
        self.quantity = quantity
        self.layer = layer
        self.sublayer = sublayer
        self.position = position
        self.value = value
        self.hint = hint
        where = [f"layer {layer}" if layer is not None else None,
                 f"sublayer {sublayer!r}" if sublayer is not None else None,
                 f"token position {position}" if position is not None else None]
        msg = f"non-finite {quantity}"
        if value is not None:
            msg += f" ({value!r})"
        where = [w for w in where if w]
        if where:
            msg += " at " + ", ".join(where)
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class PatchMismatchError(InputError):
    """Patches applied to a model, positions, convention or dtype they were not made for."""


class MissingDependencyError(MinipatchError, ImportError):
    """An optional extra is not installed (e.g. torch and transformers for ``reference``);
    the message names the ``pip install`` command."""
