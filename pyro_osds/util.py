# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Small helpers every layer uses: argument checks with one wording, user-facing warnings that point
at the user's code, random generators seeded from a parent stream, and tensors that stay on their device. This
module imports nothing from the rest of the package.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "PotentialFn",
    "check_choice",
    "check_number",
    "check_positive_int",
    "derive_seed",
    "raise_device_errors",
    "seeded_generator",
    "tensor_on_its_device",
    "warn",
]

#: A batched potential :math:`U = -\log\rho`: ``(batch, dim) -> (batch,)``.
PotentialFn = Callable[[torch.Tensor], torch.Tensor]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """Raises ``ValueError`` unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_number(name: str, value, *, low=None, high=None, low_open: bool = False) -> None:
    """Raises ``ValueError`` unless ``value`` is a real number (not a bool) in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


def check_choice(name: str, value, choices) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def _stack_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and the import machinery (NumPyro's
    ``find_stack_level``). ``warnings.warn`` does not count the import machinery's frames, so neither
    does this."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = frame.f_code.co_filename
        if not ("importlib" in filename and "_bootstrap" in filename):
            if not os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
                break
            level += 1
        frame = frame.f_back
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line that called into the package."""
    # _stack_level counts this function's frame too; warnings.warn's stacklevel=1 is its caller (this frame)
    warnings.warn(message, category, stacklevel=_stack_level())


def derive_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator`` (default: the global torch RNG, hence ``pyro.set_rng_seed``)."""
    if generator is None:
        return int(torch.randint(0, 2**62, (), device="cpu"))  # the CPU stream whatever the default device
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


def seeded_generator(device, seed: int | None = None) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded with ``seed`` (default: :func:`derive_seed`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed() if seed is None else seed)
    return generator


def tensor_on_its_device(value, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a tensor: a tensor stays on its device (``torch.as_tensor`` would move it to the default device
    under ``torch.set_default_device``, which inserts a ``device`` into every factory call that names none); Python
    numbers and lists go to the CPU."""
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    return torch.as_tensor(value, dtype=dtype, device="cpu")


#: how torch words an error of placement or of the device itself, never a property of the model
_DEVICE_ERROR_TEXTS = ("same device", "device type for generator", "is not on the expected device",
                       "Cannot re-initialize CUDA", "out of memory", "not enough memory", "device-side assert",
                       "CUDA error")


def raise_device_errors(err: BaseException) -> None:
    """Raises ``err`` again if it is an error of tensor placement or of the device (tensors on two devices, a
    generator on another device, out of memory, a CUDA error), not of the model: where a failure means "this
    candidate does not apply" (a block that is not quadratic, a fit that fails far from its start), such an error
    would otherwise turn a run on a GPU silently into a worse one."""
    if isinstance(err, torch.cuda.OutOfMemoryError) or any(text in str(err) for text in _DEVICE_ERROR_TEXTS):
        raise err
