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
