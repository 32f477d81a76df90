"""Typed launch configurations of the Triton kernel families, and the one place each family's configuration in force
is held.

A family's knobs (block sizes, warps, tiles, ...) are the fields of a frozen dataclass deriving from
:class:`LaunchConfig`, validated when it is built, with the defaults written on the fields and documented in the
class docstring: :class:`kernels.linear_attention.triton_chunk.config.ChunkLaunchConfig` (the chunked (Re)Based
attention) and :class:`kernels.short_conv.config.ShortConvLaunchConfig`. The launcher reads the configuration in
force from the family's :class:`LaunchSettings` (``CHUNK_LAUNCH``, ``SHORT_CONV_LAUNCH``) when it launches::

    from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH
    with CHUNK_LAUNCH.override(tile=4, warps_state=4):   # for a scope (tests, benchmarks); restored on exit
        ...
    CHUNK_LAUNCH.update(seg_tokens=512)                  # for the rest of the process (a benchmark's variant)

No environment variable sets a knob. (The environment switches in ``kernels/`` are others: the backend,
``REBASED_KERNEL_BACKEND`` in :mod:`kernels.backend`; the NaN-poisoning test mode, ``REBASED_TRITON_POISON`` in
:mod:`kernels.poison`; and Triton's own ``TRITON_INTERPRET``.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Generic, Iterator, Optional, Sequence, TypeVar

__all__ = ["LaunchConfig", "LaunchSettings", "check_int", "check_power_of_two", "check_choice"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(cls: str, name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{cls}.{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_power_of_two(cls: str, name: str, value: Any, *, minimum: int = 1, maximum: Optional[int] = None,
                       optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a power of two in [minimum, maximum] (or None when ``optional``)."""
    if value is None and optional:
        return
    ok = _is_int(value) and value >= minimum and value & (value - 1) == 0 and (maximum is None or value <= maximum)
    if not ok:
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{cls}.{name} must be a power of two >= {minimum}{bound}"
                         f"{' or None' if optional else ''}, got {value!r}")


def check_choice(cls: str, name: str, value: Any, choices: Sequence[Any], *, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not (_is_int(value) or isinstance(value, str)) or value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {tuple(choices)}{' or None' if optional else ''}, "
                         f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Base of a family's launch configuration: a frozen dataclass, validated in ``__post_init__`` (so also by
    :meth:`replace`)."""

    def replace(self, **changes: Any) -> "LaunchConfig":
        """A copy with ``changes`` applied (validated); an unknown knob raises TypeError naming it and the knobs."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown knob(s) {', '.join(unknown)}; the knobs: "
                            f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def overrides(self) -> Dict[str, Any]:
        """The knobs that differ from their defaults, by name (for reports)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


C = TypeVar("C", bound=LaunchConfig)


class LaunchSettings(Generic[C]):
    """The launch configuration in force for one family: replaced as a whole, never mutated.

    It is process-wide on purpose, not a context variable: autograd runs the backward of CUDA tensors on its own
    threads, and the backward's launches must see the configuration the forward saw.
    """

    def __init__(self, default: C):
        self._default = default
        self._current = default

    @property
    def default(self) -> C:
        return self._default

    def get(self) -> C:
        """The configuration in force."""
        return self._current

    def set(self, config: C) -> C:
        """Put ``config`` in force; return the one it replaces."""
        if type(config) is not type(self._default):
            raise TypeError(f"expected a {type(self._default).__name__}, got {type(config).__name__}")
        previous, self._current = self._current, config
        return previous

    def update(self, **changes: Any) -> C:
        """Put the configuration in force with ``changes`` applied (validated); return the new one."""
        self.set(self._current.replace(**changes))
        return self._current

    def reset(self) -> None:
        """Put the defaults back in force."""
        self._current = self._default

    @contextlib.contextmanager
    def override(self, config: Optional[C] = None, **changes: Any) -> Iterator[C]:
        """Within the ``with`` block, ``config`` (default: the one in force) with ``changes`` applied is in force;
        on exit the configuration from before the block is restored, whatever was set inside."""
        previous = self._current
        self.set((config if config is not None else previous).replace(**changes))
        try:
            yield self._current
        finally:
            self._current = previous
