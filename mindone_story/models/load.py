"""Strict loading of a state dict (our names: the diffusers / transformers keys) into a model.

``load_param_into_net`` reports missing and unexpected keys only through its return value, so we check names and
shapes ourselves first and refuse anything that does not match exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ..weights.keymaps import known_extra, listing


class WeightMismatchError(ValueError):
    """A checkpoint does not fit a model: missing keys, unexpected keys or wrong shapes."""


def check_state(
    expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]], source: str
) -> list[str]:
    """Compare key sets and shapes; return the ignored known extras; raise WeightMismatchError listing the keys."""
    ignored = sorted(k for k in shapes if k not in expected and known_extra(k))
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(k for k in shapes if k not in expected and k not in ignored)
    wrong = sorted(
        f"{k}: file {tuple(shapes[k])}, model {tuple(expected[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k])
    )
    problems = [
        listing(title, keys)
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if keys
    ]
    if problems:
        raise WeightMismatchError(f"weights from {source} do not fit the model:\n" + "\n".join(problems))
    return ignored


def parameter_shapes(model: nn.Cell) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.parameters_and_names()}


def load_state(model: nn.Cell, state: Mapping[str, np.ndarray], source: str, dtype: ms.Type | None = None) -> list[str]:
    """Load ``state`` into ``model`` strictly, tensor by tensor (``state`` may be a lazy mapping).

    Parameters are cast to ``dtype`` (default: keep each parameter's dtype). Returns the ignored known extras.
    """
    params = dict(model.parameters_and_names())
    ignored = check_state({k: tuple(p.shape) for k, p in params.items()}, _shapes(state), source)
    for name, param in params.items():
        target = dtype or param.dtype
        if param.dtype != target:  # set_data casts new data to the Parameter's dtype: change that first
            param.set_dtype(target)
        param.set_data(Tensor(np.ascontiguousarray(state[name]), dtype=ms.float32).astype(target))
    return ignored


def _shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    shape_of = getattr(state, "shape", None)
    if callable(shape_of):  # lazy readers expose shapes without reading the data
        return {k: tuple(shape_of(k)) for k in state}
    return {k: tuple(np.shape(v)) for k, v in state.items()}
