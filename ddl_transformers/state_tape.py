"""Residual states rebuilt during backward instead of kept from the forward pass.

A rewrite is invertible given what it wrote: `X_{i+1} = X_i + k_i w_i^T` gives back `X_i = X_{i+1} - k_i w_i^T`
(`w_i = beta_i (v_i - k_i^T X_i)`). While a `StateTape` records (the model's forward with autograd on), every tensor
that autograd saves is checked: a state (or a view of one) made by a recorded rewrite is saved as a token, so the
forward pass does not keep it. Backward asks the tape for the states in reverse order, and the tape rebuilds them in
one buffer, starting from the last state (which it keeps) and undoing one rewrite at a time, in place. The rewrites'
saved directions `h` and weights `w / ||h||` are all it needs: the expanded state, `d_v` times wider, is not kept.

Rebuilt states equal the forward's up to float rounding (one rounding per rewrite undone), so the tape is used for
float32 and float64 states only. States still alive when asked for (e.g. returned as hidden states) are used as is.
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch

_active_tape: ContextVar["StateTape | None"] = ContextVar("ddl_state_tape", default=None)

REBUILDABLE_DTYPES = (torch.float32, torch.float64)


class StateTape:
    """The states `X_0 .. X_n` of one forward pass and the rewrites between them (see the module docstring)."""

    def __init__(self) -> None:
        self.states: list[weakref.ref] = []  # weak: the forward's states are freed as usual
        self.index_of: dict[int, int] = {}  # data_ptr -> index, for the states that may still be saved as tokens
        self.rewrites: list[tuple[torch.Tensor, torch.Tensor]] = []  # (h_i, w_i / ||h_i||): X_{i+1} - X_i
        self.strides: list[tuple[int, ...]] = []  # each state's memory layout
        self.final: torch.Tensor | None = None  # the last state, kept
        self.buffer: torch.Tensor | None = None  # the state rebuilt last, and its index
        self.buffer_index = -1

    def add_state(self, state: torch.Tensor, source: torch.Tensor | None = None, rewrite=None) -> None:
        """Record `state`: the first state, or made from `source`, the last state recorded, by `rewrite`
        (`(h, w / ||h||)`). A state that does not follow on, or whose dtype cannot be rebuilt closely enough, ends the
        recording: later tensors are saved as usual, tokens already given out stay valid."""
        follows = self.final is None if source is None else source is self.final and bool(self.index_of)
        if not follows or state.dtype not in REBUILDABLE_DTYPES:
            self.index_of.clear()
            return
        if rewrite is not None:
            self.rewrites.append(rewrite)
        self.index_of[state.data_ptr()] = len(self.states)
        self.states.append(weakref.ref(state))
        self.strides.append(state.stride())
        self.final = state

    def pack(self, tensor: torch.Tensor) -> Any:
        index = self.index_of.get(tensor.data_ptr()) if tensor.numel() else None
        state = self.states[index]() if index is not None else None
        if state is not None and state.dtype == tensor.dtype and state.device == tensor.device:
            offset = tensor.storage_offset() - state.storage_offset()
            extent = offset + sum((size - 1) * stride for size, stride in zip(tensor.size(), tensor.stride()))
            if offset >= 0 and extent < state.numel():  # a view inside the state
                return _StateToken(index, tensor.size(), tensor.stride(), offset, state._version)
        return _Saved(tensor.detach(), tensor._version)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Saved):
            _check_version(packed.tensor, packed.version)
            return packed.tensor
        alive = self.states[packed.index]()
        if alive is not None:
            _check_version(alive, packed.version)
        state = self.state(packed.index)
        return state.as_strided(packed.size, packed.stride, state.storage_offset() + packed.offset)

    def state(self, index: int) -> torch.Tensor:
        """`X_index`: the forward's tensor if it is still alive, else rebuilt from the nearest later state. Under a
        backward that builds a graph (`create_graph=True`) the result is a copy, as the buffer changes in place."""
        alive = self.states[index]()
        if alive is not None:
            return alive
        if self.buffer is None or self.buffer_index < index:  # start again from the last state
            self.buffer, self.buffer_index = torch.empty_like(self.final), len(self.states) - 1
            self.buffer_index -= 1
            undo_rewrite(self.buffer, self.final.detach(), *self.rewrites[self.buffer_index])
        while self.buffer_index > index:
            self.buffer_index -= 1
            undo_rewrite(self.buffer, self.buffer, *self.rewrites[self.buffer_index])
        if self.buffer.stride() != self.strides[index]:  # e.g. a first state that is not channel-major
            layout = torch.empty_strided(
                self.buffer.shape, self.strides[index], dtype=self.buffer.dtype, device=self.buffer.device
            )
            return layout.copy_(self.buffer)
        return self.buffer.clone() if torch.is_grad_enabled() else self.buffer


class _Saved(NamedTuple):
    tensor: torch.Tensor
    version: int


class _StateToken(NamedTuple):
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    version: int


def _check_version(tensor: torch.Tensor, version: int) -> None:
    """The check autograd makes on saved tensors (it skips it when saved-tensor hooks are in use)."""
    if tensor._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: a tensor "
            f"saved in a DDL forward pass is at version {tensor._version}; expected version {version} instead. Do "
            "not modify parameters or inputs in place between a forward pass and its backward."
        )


def undo_rewrite(out: torch.Tensor, state: torch.Tensor, direction: torch.Tensor, weights: torch.Tensor) -> None:
    """`out = X - h w^T` (`out` may be `X`), with `h` `(..., d)` and `w` `(..., d_v)` (scalar state: `(..., 1)`)."""
    if state.dim() == direction.dim():
        torch.addcmul(state, weights, direction, value=-1, out=out)
    else:
        channels = state.transpose(-1, -2)  # (..., d_v, d)
        torch.addcmul(channels, weights.unsqueeze(-1), direction.unsqueeze(-2), value=-1, out=out.transpose(-1, -2))


def record_rewrite(new_state: torch.Tensor, state: torch.Tensor, direction: torch.Tensor, weights: torch.Tensor):
    """Called by the fused rewrite: `new_state = state + direction weights^T`, recorded if a tape is active."""
    if torch.compiler.is_compiling():  # compiled code records no tape, and Dynamo cannot read a context variable
        return
    tape = _active_tape.get()
    if tape is not None:
        tape.add_state(new_state, state, (direction.detach(), weights.detach()))


@contextmanager
def record_states(initial_state: torch.Tensor) -> Iterator[StateTape]:
    """Record the states that follow `initial_state` and save them as tokens until the block ends."""
    tape = StateTape()
    tape.add_state(initial_state)
    reset = _active_tape.set(tape)
    try:
        with torch.autograd.graph.saved_tensors_hooks(tape.pack, tape.unpack):
            yield tape
    finally:
        _active_tape.reset(reset)
