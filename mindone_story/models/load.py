"""Strict loading of weights (our names: the diffusers / transformers keys) into a model, tensor by tensor.

``load_param_into_net`` reports missing and unexpected keys only through its return value, so the one strict check
(``weights.keymaps.check``, against the model's own parameter shapes) runs first and refuses anything that does not
match exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ..errors import LayoutError
from ..weights.keymaps import check

WeightMismatchError = LayoutError  # (the name this module used before there was one strict check)


def parameter_shapes(model: nn.Cell) -> dict[str, tuple[int, ...]]:
    """The model's own names and shapes: the one description of what a checkpoint must hold."""
    return {name: tuple(p.shape) for name, p in model.parameters_and_names()}


def check_state(
    model: nn.Cell | Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray], source: str
) -> list[str]:
    """``check`` against ``model`` (or its parameter shapes): raise LayoutError listing the keys; return the ignored
    known extras."""
    return check(parameter_shapes(model) if isinstance(model, nn.Cell) else model, state, source)


def load_state(
    model: nn.Cell, state: Mapping[str, np.ndarray], source: str, dtype: ms.Type | None = None, checked: bool = False
) -> list[str]:
    """Load ``state`` into ``model`` strictly, tensor by tensor (``state`` may be a lazy mapping; ``checked``: the
    caller already ran ``check_state``). Parameters are cast to ``dtype`` (default: keep each parameter's dtype).
    Returns the ignored known extras."""
    ignored = [] if checked else check_state(model, state, source)
    for name, param in model.parameters_and_names():
        target = dtype or param.dtype
        if param.dtype != target:  # set_data casts new data to the Parameter's dtype: change that first
            param.set_dtype(target)
        param.set_data(Tensor(np.ascontiguousarray(state[name]), dtype=ms.float32).astype(target))
    return ignored
