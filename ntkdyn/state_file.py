"""A nested state in one safetensors file, loaded without unpickling anything: what a checkpoint holds.

A state is dicts, lists, tuples, tensors, numpy arrays, numbers, strings and None (a model's and an
optimizer's state_dict, RNG states, a position). The tensors (and arrays) are stored as safetensors
tensors named by their path in the state; everything else is JSON in the file's metadata ("state"),
where a tensor is {"tensor": name}, an array {"ndarray": name, "dtype": ...}, a tuple {"tuple": [...]}
and a dict {"dict": [[key, value], ...]} (so that int keys, as in an optimizer's state, stay int).
Base layer: the standard library, numpy, torch and safetensors (through ntkdyn.rundir).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from ntkdyn.rundir import load_metadata, load_tensors, save_tensors


def save_state(path: str | os.PathLike, state: Any) -> None:
    """A nested state (dicts, lists, tuples, tensors, numpy arrays, numbers, strings, None: a model's
    and an optimizer's state_dict, RNG states, ...) as one safetensors file, atomically: the tensors
    (named by their path in the state), the rest as JSON in the metadata ("state"). Loading it
    (:func:`load_state`) unpickles nothing."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, (), tensors)
    save_tensors(path, tensors, {"state": json.dumps(encoded)})


def load_state(path: str | os.PathLike) -> Any:
    """The state :func:`save_state` wrote; ValueError naming the file if it is anything else."""
    check_state(path)
    tensors, metadata = load_tensors(path)
    return _decode(json.loads(metadata["state"]), tensors)


def check_state(path: str | os.PathLike) -> None:
    """ValueError naming the file unless it is a :func:`save_state` file (only its header is read)."""
    try:
        json.loads(load_metadata(path)["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} holds no saved state ({type(err).__name__}: {err})") from None


def _encode(obj: Any, where: tuple, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of obj: tensors and arrays become {"tensor": key} / {"ndarray": key, "dtype": ...}
    (stored under key), tuples {"tuple": [...]}, dicts {"dict": [[key, value], ...]} (int keys stay int)."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        key = "/".join(str(w) for w in where) or "value"
        if key in tensors:
            raise ValueError(f"save_state: two tensors at the path {key!r}")
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj
            return {"tensor": key}
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj)
        return {"ndarray": key, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, (*where, k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, (*where, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, (*where, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"save_state: cannot store {type(obj).__name__} at {'/'.join(map(str, where))!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        return tensors[obj["tensor"]]
    if "ndarray" in obj:
        return tensors[obj["ndarray"]].numpy().astype(np.dtype(obj["dtype"]))
    if "tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["tuple"])
    return {k: _decode(v, tensors) for k, v in obj["dict"]}
