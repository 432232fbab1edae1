"""The backend registry.

A backend runs one direction of one layer over a whole sequence::

    run(seq, state, params) -> (output, final state)
    seq: Sequence, data (T, B, I) or packed rows (R, I) with batch_sizes; state: State, h (B, P)
    and c (B, H); params: LayerParams; output laid out as seq.data, (T, B, P) or (R, P); the
    final State holds each sequence's h and c after its own last step

says on which devices it can run, and which optional features of the input it supports
(:data:`FEATURES`). Every backend computes the same function as
:func:`mogrifier_fast.mogrify.mogrifier_lstm_sequence`, with the same gradients. Built-in
backends are imported lazily by name; :func:`register` adds others.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mogrifier_fast.mogrify import LayerParams, Sequence, State

RunFn = Callable[[Sequence, State, LayerParams], tuple[Tensor, State]]

# What a backend may support beyond a padded batch without projections: "packed", a packed
# batch of variable-length sequences (Sequence.batch_sizes); "proj", projected hidden states
# (LayerParams.w_hr, nn.LSTM's proj_size); "state_mask", a mask on the hidden state every step
# reads (Sequence.state_mask: variational state dropout inside the recurrence).
FEATURES = frozenset({"packed", "proj", "state_mask"})


def runs_everywhere(device: torch.device) -> str | None:
    """The availability check of a backend made of plain torch ops: it runs on any device."""
    return None


@dataclass(frozen=True)
class Backend:
    """A named way to run the recurrence.

    ``unavailable_reason(device)`` returns None where the backend runs on ``device``, else a
    short reason it does not; ``supports`` is the subset of :data:`FEATURES` it runs.
    """

    name: str
    run: RunFn
    unavailable_reason: Callable[[torch.device], str | None] = field(default=runs_everywhere)
    supports: frozenset[str] = FEATURES


@contextlib.contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """Silence TorchScript's deprecation warnings (torch >= 2.11) within a backend's own calls."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings(
                "ignore", message=r".*(torch\.jit|TorchScript).*deprecated", category=category
            )
        yield


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through a call on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_double_backward(name: str) -> None:
    """Called first in a hand-written backward: raise if it is being differentiated itself."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend {name!r} does not support double backward (create_graph=True): its "
            "backward is hand-written; use backend='reference' for higher-order gradients"
        )


class BackendUnavailableError(ValueError, RuntimeError):
    """A known backend cannot run here (on this device, or without an optional package)."""


# Every backend name of the public contract, and the module that defines its ``BACKEND``
# (None: not part of this release yet).
BUILTIN_MODULES: dict[str, str | None] = {
    "reference": "mogrifier_fast.reference",
    "fused": "mogrifier_fast.backends.fused",
    "compile": "mogrifier_fast.backends.compiled",
    "script": "mogrifier_fast.backends.scripted",
    "triton": "mogrifier_fast.backends.triton_steps",
    "cudnn": "mogrifier_fast.backends.cudnn_steps",
    "persistent": "mogrifier_fast.backends.persistent",
}

# What "auto" tries, fastest first, by device type; the first that runs is taken.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("fused", "reference"),
    "cuda": ("fused", "reference"),
}
DEFAULT_PREFERENCE: tuple[str, ...] = ("fused", "reference")

_registered: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``; returns it."""
    if backend.name == "auto":
        raise ValueError("backend.name: 'auto' is reserved for automatic selection")
    _registered[backend.name] = backend
    _loaded.clear()
    return backend


def backend_names() -> list[str]:
    """Every backend name ``MogrifierLSTM(backend=...)`` accepts, "auto" included."""
    return ["auto", *dict.fromkeys([*BUILTIN_MODULES, *_registered])]


def check_backend_name(name: object) -> None:
    """Raise ValueError (TypeError for a non-string) unless ``name`` is a known backend name."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name not in backend_names():
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {backend_names()}")


# Loaded backends (or why not) by name: a plain dict, which torch.compile reads without tracing
# into a cache wrapper.
_loaded: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend called ``name``, or the reason it cannot be loaded here."""
    if name not in _loaded:
        _loaded[name] = _import_backend(name)
    return _loaded[name]


def _import_backend(name: str) -> Backend | str:
    if name in _registered:
        return _registered[name]
    module_name = BUILTIN_MODULES[name]
    if module_name is None:
        return "not implemented in this release"
    try:
        return importlib.import_module(module_name).BACKEND
    except ImportError as error:
        return f"its dependencies are missing ({error})"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` runs on ``device`` here, else why not."""
    backend = _load(name)
    return backend if isinstance(backend, str) else backend.unavailable_reason(device)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that run on ``device`` on this machine ("auto" is never listed)."""
    device = torch.device(device)
    return [name for name in backend_names()[1:] if unavailable_reason(name, device) is None]


def plain_torch_required() -> bool:
    """Whether the call is being traced or exported (``torch.jit.trace``, ``torch.onnx.export``
    by either exporter, ``torch.export.export``), where the graph must hold plain torch ops
    only (the C++ ops of backend "fused" cannot be lowered to ONNX, and an exported program
    should run where this package is not loaded): "auto" then runs the reference. Not under
    ``torch.compile``, which runs "fused" as it runs in eager."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def supported_features(name: str) -> frozenset[str]:
    """The features of :data:`FEATURES` that backend ``name`` supports (none where it cannot
    be loaded here)."""
    backend = _load(name)
    return frozenset() if isinstance(backend, str) else backend.supports


def check_features(name: str, features: frozenset[str] | set[str]) -> None:
    """Raise ValueError unless backend ``name`` ("auto" always can) supports ``features``."""
    missing = sorted(set(features) - supported_features(name)) if name != "auto" else []
    if missing:
        able = [b for b in backend_names()[1:] if set(features) <= supported_features(b)]
        raise ValueError(
            f"backend={name!r} does not support {', '.join(missing)} "
            f"({FEATURE_NAMES[missing[0]]}); backends that do: {able}"
        )


FEATURE_NAMES = {
    "packed": "PackedSequence input",
    "proj": "proj_size > 0",
    "state_mask": "state_mask, dropout on the recurrent state at every step",
}


def resolve(
    name: str, device: torch.device, features: frozenset[str] | set[str] = frozenset()
) -> Backend:
    """The backend to run for ``name`` on ``device`` with ``features`` of :data:`FEATURES`;
    "auto" picks the fastest that runs there and supports them."""
    if name == "auto" and plain_torch_required():
        name = "reference"
    if name == "auto":
        preference = AUTO_PREFERENCE.get(device.type, DEFAULT_PREFERENCE)
        name = next(
            (
                n
                for n in preference
                if unavailable_reason(n, device) is None and set(features) <= supported_features(n)
            ),
            "reference",
        )
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend={name!r} cannot run on device {device}: {reason}; "
            f"available there: {available_backends(device)}"
        )
    check_features(name, features)
    backend = _load(name)
    assert isinstance(backend, Backend)
    return backend
