"""DDL's CPU kernels: the rewrite without autograd (decoding, prefill and evaluation without gradients) as one C call
instead of about ten PyTorch operations, each of which costs microseconds to dispatch when a token is decoded; and,
for training, one pass over the state each for the rewrite with its value and gate projections (forward, and backward
to the projections' outputs), CC's read and its backward, and EC's and TC's token convolutions and their backwards.

Chosen by `delta_ops.set_implementation("native")` (the default) for float32 CPU tensors; everything else keeps the
fused PyTorch operators. The C source (`cpu_kernels.c`, next to this file) is compiled on first use with the system's
C compiler (`$CC`, else `cc`) into a cache folder (`$DDL_TRANSFORMERS_CACHE`, else `~/.cache/ddl_transformers`) and
loaded with `ctypes`; OpenMP threads follow `torch.get_num_threads()`. Not part of a saved model's remote code.
"""

import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from .delta_ops import _empty_channel_major

SOURCE = Path(__file__).with_name("cpu_kernels.c")
EXTENSION_SOURCE = Path(__file__).with_name("cpu_extension.cpp")
EXTENSION_VARIABLE = "DDL_TRANSFORMERS_CPU_EXTENSION"  # "1": build the C++ extension on first use; "0": never use it
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
_POINTER, _SIZE, _FLOAT, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # the C functions' arguments, in order
    "ddl_rewrite": [_POINTER] * 5 + [_SIZE] * 3 + [_FLOAT, _INT, _INT],
    "ddl_rewrite_forward": [_POINTER] * 9 + [_SIZE] * 3 + [_FLOAT, _INT, _INT],
    "ddl_rewrite_backward": [_POINTER] * 11 + [_SIZE] * 3 + [_INT, _INT],
    "ddl_projected_rewrite": [_POINTER] * 8 + [_SIZE] * 3 + [_FLOAT, _INT, _INT, _FLOAT, _INT],
    "ddl_projected_rewrite_forward": [_POINTER] * 13 + [_SIZE] * 3 + [_FLOAT, _INT, _INT, _FLOAT, _INT],
    "ddl_projected_rewrite_backward": [_POINTER] * 10 + [_SIZE] * 3 + [_INT, _INT, _FLOAT, _INT],
    "ddl_channel_mix": [_POINTER] * 3 + [_SIZE] * 3 + [_INT],
    "ddl_channel_mix_backward": [_POINTER] * 6 + [_SIZE] * 3 + [_INT],
    "ddl_token_mix_step": [_POINTER] * 5 + [_SIZE] * 8,
    "ddl_expansion_step": [_POINTER] * 3 + [_SIZE] * 7,
    "ddl_expansion_forward": [_POINTER] * 3 + [_SIZE] * 5 + [_INT],
    "ddl_expansion_backward": [_POINTER] * 6 + [_SIZE] * 5 + [_INT],
    "ddl_token_conv_forward": [_POINTER] * 3 + [_SIZE] * 6 + [_INT],
    "ddl_token_conv_backward": [_POINTER] * 6 + [_SIZE] * 6 + [_INT],
}


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where the compiled library is kept: `$DDL_TRANSFORMERS_CACHE`, else `$XDG_CACHE_HOME/ddl_transformers`, else
    `~/.cache/ddl_transformers`."""
    if os.environ.get("DDL_TRANSFORMERS_CACHE"):
        return Path(os.environ["DDL_TRANSFORMERS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddl_transformers"


def _compiler() -> list[str]:
    """`$CC` split into words (e.g. `ccache gcc`), else `cc`."""
    return shlex.split(os.environ.get("CC") or "cc")


def library_path() -> Path:
    """The compiled library's path; its name holds a hash of the source, the compiler and the flags."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((*_compiler(), *FLAGS)).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{platform.machine()}-{key}.so"


def _compile(path: Path) -> None:
    """Compile the source into `path`, atomically (processes that start together each compile and rename)."""
    command = [*_compiler(), *FLAGS, str(SOURCE), "-o", str(path.name), "-lm"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"`{shlex.join(command)}` failed: {result.stderr.strip() or 'no message'}")
        os.replace(Path(scratch) / path.name, path)


@functools.cache
def load() -> ctypes.CDLL:
    """The library, compiled first if the cache lacks it. Raises `KernelBuildError` with the cause and the fix."""
    path = None
    try:
        path = library_path()
        cached = path.exists()
        if not cached:
            _compile(path)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:  # KernelBuildError is a RuntimeError; so is Path.home() without a home
        stale = f" If {path} is a damaged or foreign build, delete it to rebuild." if path and cached else ""
        raise KernelBuildError(
            f"DDL's CPU kernels could not be built or loaded ({error}). They need a C compiler with OpenMP (`cc`, or "
            f"set `CC`) and a writable cache folder (set DDL_TRANSFORMERS_CACHE to choose one).{stale} Without them, "
            "`delta_ops.set_implementation('fused')` runs the same model with PyTorch operators."
        ) from error
    for name, argtypes in _SIGNATURES.items():
        kernel = getattr(library, name)
        kernel.argtypes, kernel.restype = argtypes, None
    return library


def extension_name() -> str:
    """The C++ extension's module name: a hash of both sources, torch's and Python's versions, the machine and
    `$CXX`."""
    parts = (SOURCE.read_bytes(), EXTENSION_SOURCE.read_bytes(), torch.__version__, sys.version, platform.machine())
    parts += (os.environ.get("CXX"),)
    return "ddl_cpu_extension_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _extension_dir(name: str) -> Path:
    """The extension's build folder (its library is `<name>.so` there)."""
    return cache_dir() / name


def build_extension(verbose: bool = False) -> ModuleType:
    """Build (once per source and torch version; about 30 s on 2 cores) and load the decoding kernels as a PyTorch C++
    extension (`cpu_extension.cpp`, with `torch.utils.cpp_extension`: a C++ compiler, ninja and PyTorch's headers).
    Once built into the cache folder it is used by itself in later processes; `DDL_TRANSFORMERS_CPU_EXTENSION=1`
    builds it on first use, `=0` never uses it. Raises `KernelBuildError` with the cause and the fix."""
    from torch.utils import cpp_extension

    name = extension_name()
    directory = _extension_dir(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _environment_path_first(Path(sys.executable).parent):  # a virtual environment's ninja, not activated
            return cpp_extension.load(
                name,
                [str(EXTENSION_SOURCE)],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(SOURCE.parent)],
                build_directory=str(directory),
                verbose=verbose,
            )
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        raise KernelBuildError(
            f"DDL's C++ extension could not be built or loaded ({error}). It needs a C++ compiler, ninja "
            f"(`pip install ninja`) and PyTorch's headers, and a writable cache folder ({directory}). Without it the "
            f"ctypes kernels run (set {EXTENSION_VARIABLE}=0 to stop trying)."
        ) from error


@contextmanager
def _environment_path_first(folder: Path) -> Iterator[None]:
    """`folder` first on `PATH` for the block (`torch.utils.cpp_extension` looks for `ninja` on `PATH`)."""
    previous = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(folder), previous]))
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = previous


def _import_built_extension() -> ModuleType | None:
    """The extension's library from the cache folder, imported as it is (no build tool, no lock), or None if absent."""
    name = extension_name()
    path = _extension_dir(name) / f"{name}.so"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def extension() -> ModuleType | None:
    """The C++ extension where it is wanted: already built into the cache folder (imported as it is), or requested
    with `DDL_TRANSFORMERS_CPU_EXTENSION=1` (then built now); else, or with a warning where that fails, None (the
    ctypes calls run)."""
    requested = os.environ.get(EXTENSION_VARIABLE)
    if requested == "0":
        return None
    try:
        module = _import_built_extension()
        if module is None and requested == "1":
            module = build_extension()
        return module
    except (KernelBuildError, OSError, ImportError) as error:  # OSError: e.g. a missing source or an unreadable cache
        if requested == "1" or not isinstance(error, FileNotFoundError):  # unasked-for and absent: nothing to say
            fallback = "" if isinstance(error, KernelBuildError) else " The ctypes calls run instead."  # it says so
            warnings.warn(f"{error}{fallback}", RuntimeWarning, stacklevel=2)
        return None


MAX_CHANNELS = 64  # the projected rewrite keeps a token's target on the stack
_PLAIN, _FLOAT32, _STRIDED = (torch.Tensor, torch.nn.Parameter), torch.float32, torch.strided


def _plain_float32_cpu(tensor: torch.Tensor) -> bool:
    """A float32 CPU tensor with its own strided storage, read as stored: no subclass (fake, quantised or other wrapper
    tensors), no lazy negation (e.g. the imaginary part of a conjugate)."""
    return (
        type(tensor) in _PLAIN
        and tensor.is_cpu
        and tensor.dtype == _FLOAT32
        and tensor.layout == _STRIDED
        and not tensor.is_neg()
    )


def _applies(state: torch.Tensor, direction: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: plain float32 CPU tensors with storage (no subclass, no fake or
    quantised wrapper), `direction` and `others` contiguous, the state `(..., d)` or `(..., d, d_v)` with the
    direction's tokens and channel-major (each token's channels contiguous rows of `d` floats). One plain loop: this
    runs for every decoded token and sublayer."""
    for tensor in (direction, *others):
        if not (_plain_float32_cpu(tensor) and tensor.is_contiguous()):
            return False
    if direction.dim() == 0 or not _plain_float32_cpu(state):
        return False
    if state.dim() == direction.dim():
        return state.shape == direction.shape and state.is_contiguous()
    return state.dim() == direction.dim() + 1 and state.shape[:-1] == direction.shape and state.mT.is_contiguous()


def _empty_float32(*sizes: int) -> torch.Tensor:
    """A new contiguous float32 CPU tensor. Plain `torch.empty(*sizes)` (keyword arguments cost 5 us more per call in
    the model), checked, since the default dtype or device may have been changed."""
    out = torch.empty(*sizes)
    return out if out.is_cpu and out.dtype == _FLOAT32 else torch.empty(*sizes, dtype=_FLOAT32, device="cpu")


def _pointers(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.data_ptr() for tensor in tensors)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data pointer, or NULL for None."""
    return None if tensor is None else tensor.data_ptr()


def _sizes(state: torch.Tensor, direction: torch.Tensor) -> tuple[int, int, int]:
    """`(tokens, d, d_v)` of a state `(..., d)` or `(..., d, d_v)` and its direction `(..., d)`."""
    hidden = direction.shape[-1]
    channels = 1 if state.dim() == direction.dim() else state.shape[-1]
    return (direction.numel() // hidden if hidden else 0), hidden, channels


def rewrite(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float, erase: bool
) -> torch.Tensor | None:
    """The rewrite without autograd in one call, or None where the kernel does not apply (see `_applies`; other
    shapes than state `(..., d)` or `(..., d, d_v)`, direction `(..., d)`, target `(..., d_v)`, beta `(..., 1)`). An
    expanded result is channel-major, like its input."""
    target, beta = target.contiguous(), beta.contiguous()
    if not _applies(state, direction, target, beta):
        return None
    tokens, hidden, channels = _sizes(state, direction)
    if target.shape != (*direction.shape[:-1], channels) or beta.shape != (*direction.shape[:-1], 1):
        return None
    out = torch.empty_like(state)  # keeps the channel-major strides
    threads = torch.get_num_threads()
    pointers = _pointers(state, direction, target, beta, out)
    load().ddl_rewrite(*pointers, tokens, hidden, channels, eps, int(erase), threads)
    return out


def takes_rewrite(state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor) -> bool:
    """Whether `rewrite_forward` takes these inputs (see `_applies`): target `(..., d_v)` and gate `(..., 1)` with the
    direction's tokens."""
    if not _applies(state, direction, target, beta):
        return False
    _, _, channels = _sizes(state, direction)
    lead = direction.shape[:-1]
    return target.shape == (*lead, channels) and beta.shape == (*lead, 1)


def _training_outputs(state: torch.Tensor, direction: torch.Tensor, erase: bool) -> tuple[torch.Tensor, ...]:
    """The rows and the new, uninitialised outputs of a rewrite for training, laid out as `delta_ops._rewrite_forward`
    lays them out: the new state, the input state's channels, `h`, and per token `scale`, `read` (None without the
    erase term), `error` and `coef`. A scalar state keeps its leading shape; an expanded one is flattened to rows
    `(N, d_v)` (the channels `(N, d_v, d)`), and its new state is channel-major."""
    tokens, hidden, channels = _sizes(state, direction)
    if state.dim() == direction.dim():
        per_token = (*direction.shape[:-1], 1)
        new_state = torch.empty_like(state)
    else:
        per_token = (tokens, channels)
        new_state = _empty_channel_major(state.shape, state)
        state = state.transpose(-1, -2).reshape(tokens, channels, hidden)  # a view: the state is channel-major
        direction = direction.reshape(tokens, hidden)
    scale = _empty_float32(*per_token[:-1], 1)
    read = _empty_float32(*per_token) if erase else None
    error, coef = _empty_float32(*per_token), _empty_float32(*per_token)
    return new_state, state, direction, scale, read, error, coef


def rewrite_forward(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float, erase: bool
) -> tuple[torch.Tensor | None, ...]:
    """The rewrite for training (inputs that `takes_rewrite`) in one pass over the state, with what the fused
    backward and the state tape need (see `_training_outputs`): the new state, the input state's channels, `h`,
    `beta`, and per token `scale`, `read`, `error` and `coef`."""
    tokens, hidden, channels = _sizes(state, direction)
    new_state, state, direction, scale, read, error, coef = _training_outputs(state, direction, erase)
    target, beta = target.reshape(error.shape), beta.reshape(scale.shape)
    pointers = (*_pointers(state, direction, target, beta, new_state, scale), _pointer(read), *_pointers(error, coef))
    threads = torch.get_num_threads()
    load().ddl_rewrite_forward(*pointers, tokens, hidden, channels, eps, int(erase), threads)
    return new_state, state, direction, beta, scale, read, error, coef


def _backward_rows(
    grad_out: torch.Tensor,
    scalar: bool,
    channels: torch.Tensor | None,
    h: torch.Tensor,
    beta: torch.Tensor,
    scale: torch.Tensor,
    read: torch.Tensor | None,
    error: torch.Tensor,
) -> tuple[torch.Tensor, int, int, int] | None:
    """`grad_out` as contiguous channel rows and `(tokens, d, d_v)`, where the saved tensors are as a training forward
    left them and `grad_out` is a plain float32 CPU tensor of the state's size outside a traced (compiled autograd)
    or transformed (functorch) backward; else None."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    hidden = h.shape[-1] if h.dim() else 0
    value_channels = 1 if scalar else error.shape[-1]
    tokens = h.numel() // hidden if hidden else 0
    erase = channels is not None
    saved = [h, beta, scale, error] + ([channels, read] if erase else [])
    sizes = [tokens * hidden, tokens, tokens, tokens * value_channels]
    sizes += [tokens * value_channels * hidden, tokens * value_channels] if erase else []
    if any(
        t is None or not (_plain_float32_cpu(t) and t.is_contiguous()) or t.numel() != n for t, n in zip(saved, sizes)
    ):
        return None
    if not _plain_float32_cpu(grad_out) or grad_out.numel() != tokens * value_channels * hidden:
        return None
    if not scalar and (grad_out.dim() < 2 or grad_out.shape[-2:] != (hidden, value_channels)):
        return None
    grad = grad_out if scalar else grad_out.transpose(-1, -2).reshape(tokens, value_channels, hidden)
    return grad.contiguous(), tokens, hidden, value_channels  # channel-major rows (a copy only if the layout differs)


def _state_gradient(grad_out: torch.Tensor, scalar: bool, erase: bool, state_grad: bool) -> torch.Tensor | None:
    """The state's gradient to write (the state's layout): `grad_out` itself without the erase term (the write-only
    control passes it on), a new tensor with it, None if not `state_grad`."""
    if not erase:
        return grad_out
    if not state_grad:
        return None
    return _empty_float32(*grad_out.shape) if scalar else _empty_channel_major(grad_out.shape, grad_out)


def rewrite_backward(
    grad_out: torch.Tensor,
    scalar: bool,
    channels: torch.Tensor | None,
    h: torch.Tensor,
    beta: torch.Tensor,
    scale: torch.Tensor,
    read: torch.Tensor | None,
    error: torch.Tensor,
    state_grad: bool = True,
) -> tuple[torch.Tensor | None, ...] | None:
    """The rewrite's backward in one pass, from what `rewrite_forward` saved (`channels` None without the erase
    term): the gradient of the state (`grad_out` itself without the erase term; channel-major if expanded; None if
    not `state_grad`), and those of `h`, the target and the gate, laid out as the saved tensors. None where a tensor
    is not as `rewrite_forward` left it (a saved-tensor hook may have changed it), `grad_out` is not a plain float32
    CPU tensor of the state's size, or the backward is traced (compiled autograd) or transformed (functorch): the
    caller then runs the eager backward."""
    rows = _backward_rows(grad_out, scalar, channels, h, beta, scale, read, error)
    if rows is None:
        return None
    grad, tokens, hidden, value_channels = rows
    erase = channels is not None
    grad_state = _state_gradient(grad_out, scalar, erase, state_grad)
    grad_h, grad_target, grad_beta = (_empty_float32(*t.shape) for t in (h, error, beta))
    state_rows = channels if erase else grad  # not read without the erase term
    pointers = (*_pointers(grad, state_rows, h, scale, beta), _pointer(read), error.data_ptr())
    pointers += (_pointer(grad_state if erase else None), *_pointers(grad_h, grad_target, grad_beta))
    load().ddl_rewrite_backward(*pointers, tokens, hidden, value_channels, int(erase), torch.get_num_threads())
    return grad_state, grad_h, grad_target, grad_beta


def _projection_shapes_match(
    direction: torch.Tensor,
    context: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    channels: int,
) -> bool:
    """Whether the context is shaped like the direction and the projections as `nn.Linear(d, d_v)` and
    `nn.Linear(d, 1)` have them, with at most `MAX_CHANNELS` channels."""
    hidden = direction.shape[-1]
    return (
        channels <= MAX_CHANNELS
        and context.shape == direction.shape
        and value_weight.shape == (channels, hidden)
        and gate_weight.shape == (1, hidden)
        and gate_bias.shape == (1,)
        and (value_bias is None or value_bias.shape == (channels,))
    )


def _value_activation(value_scale: float | None) -> tuple[int, float]:
    """The C kernels' `(value_sigmoid, value_scale)` for a target `value_scale * sigmoid(.)`, or as it is for None."""
    return int(value_scale is not None), 1.0 if value_scale is None else value_scale


def takes_projected_rewrite(
    state: torch.Tensor,
    direction: torch.Tensor,
    context: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> bool:
    """Whether `projected_rewrite_forward` takes these inputs (see `_applies` and `_projection_shapes_match`)."""
    weights = (value_weight, gate_weight, gate_bias) + (() if value_bias is None else (value_bias,))
    if not _applies(state, direction, context, *weights):
        return False
    channels = _sizes(state, direction)[2]
    return _projection_shapes_match(direction, context, value_weight, value_bias, gate_weight, gate_bias, channels)


def projected_rewrite_forward(
    state: torch.Tensor,
    direction: torch.Tensor,
    context: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    eps: float,
    erase: bool,
    value_scale: float | None,
) -> tuple[torch.Tensor | None, ...]:
    """The projected rewrite for training (inputs that `takes_projected_rewrite`) in one pass: the target and gate
    from the context as in `projected_rewrite`, then the rewrite as in `rewrite_forward`, with the same outputs except
    that the gate is the one computed and the target takes the error's place (see `ddl_projected_rewrite_forward`)."""
    tokens, hidden, channels = _sizes(state, direction)
    new_state, state, direction, scale, read, target, coef = _training_outputs(state, direction, erase)
    beta = _empty_float32(*scale.shape)
    pointers = (*_pointers(state, direction, context, value_weight), _pointer(value_bias))
    pointers += (*_pointers(gate_weight, gate_bias, new_state, beta, scale), _pointer(read), *_pointers(target, coef))
    value_sigmoid, value_scale = _value_activation(value_scale)
    load().ddl_projected_rewrite_forward(
        *pointers, tokens, hidden, channels, eps, int(erase), value_sigmoid, value_scale, torch.get_num_threads()
    )
    return new_state, state, direction, beta, scale, read, target, coef


def projected_rewrite_backward(
    grad_out: torch.Tensor,
    scalar: bool,
    saved: tuple[torch.Tensor | None, ...],
    value_scale: float | None,
    state_grad: bool,
) -> tuple[torch.Tensor | None, ...] | None:
    """The projected rewrite's backward up to its projections' outputs in one pass, from what
    `projected_rewrite_forward` saved (`saved`: the channels, `h`, `scale`, `beta`, `read` and the target): the
    gradients of the state (as `rewrite_backward` gives it), of `h` (as saved) and of the value and gate logits, as
    rows `(N, d_v + 1)` (the gate's last). None where `rewrite_backward` would give None."""
    channels, h, scale, beta, read, target = saved
    rows = _backward_rows(grad_out, scalar, channels, h, beta, scale, read, target)
    if rows is None:
        return None
    grad, tokens, hidden, value_channels = rows
    if value_channels > MAX_CHANNELS:
        return None
    erase = channels is not None
    grad_state = _state_gradient(grad_out, scalar, erase, state_grad)
    grad_h, grad_logits = _empty_float32(*h.shape), _empty_float32(tokens, value_channels + 1)
    state_rows = channels if erase else grad  # not read without the erase term
    pointers = (*_pointers(grad, state_rows, h, scale, beta), _pointer(read), target.data_ptr())
    pointers += (_pointer(grad_state if erase else None), *_pointers(grad_h, grad_logits))
    value_sigmoid, value_scale = _value_activation(value_scale)
    load().ddl_projected_rewrite_backward(
        *pointers, tokens, hidden, value_channels, int(erase), value_sigmoid, value_scale, torch.get_num_threads()
    )
    return grad_state, grad_h, grad_logits


def projected_rewrite(
    state: torch.Tensor,
    direction: torch.Tensor,
    context: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    eps: float,
    erase: bool,
    value_scale: float | None,
) -> torch.Tensor | None:
    """The rewrite with its target `W_v c + b_v` (then `value_scale * sigmoid(.)` unless `value_scale` is None) and
    gate `2 sigmoid(w_g c + b_g)` computed from the context `c` `(..., d)` in the same call, without autograd; None
    where the kernel does not apply. Weights as in `nn.Linear`: `(d_v, d)`, `(d_v,)`, `(1, d)`, `(1,)`. The C++
    extension makes the same checks and call where it is built (see `extension`)."""
    weights = (value_weight, gate_weight, gate_bias) + (() if value_bias is None else (value_bias,))
    cpp = extension()
    if cpp is not None and all(type(tensor) in _PLAIN for tensor in (state, direction, context, *weights)):
        return cpp.projected_rewrite(
            state, direction, context, value_weight, value_bias, gate_weight, gate_bias, eps, erase, value_scale
        )
    if not _applies(state, direction, context, *weights):
        return None
    tokens, hidden, channels = _sizes(state, direction)
    if not _projection_shapes_match(direction, context, value_weight, value_bias, gate_weight, gate_bias, channels):
        return None
    out = torch.empty_like(state)
    pointers = (*_pointers(state, direction, context, value_weight), _pointer(value_bias))
    pointers += _pointers(gate_weight, gate_bias, out)
    value_sigmoid, value_scale = _value_activation(value_scale)
    load().ddl_projected_rewrite(
        *pointers, tokens, hidden, channels, eps, int(erase), value_sigmoid, value_scale, torch.get_num_threads()
    )
    return out


def channel_mix(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """CC's read `sum_j w[:, j] X[..., :, j]` of a channel-major state `(..., d, d_v)` with the weight `(d, d_v)`, in
    one call without autograd; None where the kernel does not apply. The C++ extension where it is built."""
    cpp = extension()
    if cpp is not None and type(state) in _PLAIN and type(weight) in _PLAIN:
        return cpp.channel_mix(state, weight)
    if state.dim() < 2 or weight.shape != state.shape[-2:]:
        return None
    if not (_plain_float32_cpu(state) and _plain_float32_cpu(weight)):
        return None
    if not (weight.is_contiguous() and state.mT.is_contiguous()):
        return None
    hidden, channels = weight.shape
    out = _empty_float32(*state.shape[:-1])
    tokens = out.numel() // hidden if hidden else 0
    load().ddl_channel_mix(
        state.data_ptr(), weight.data_ptr(), out.data_ptr(), tokens, hidden, channels, torch.get_num_threads()
    )
    return out


def channel_mix_backward(
    grad_out: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, state_grad: bool, weight_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients of CC's read `channel_mix(state, weight)` (state and weight as `channel_mix` takes them) from
    `grad_out` `(..., d)` in one pass: the state's (channel-major; None unless `state_grad`) and the weight's (None
    unless `weight_grad`). None where the kernel does not apply."""
    if weight.dim() != 2 or state.shape[-2:] != weight.shape or grad_out.shape != state.shape[:-1]:
        return None
    if not all(_plain_float32_cpu(tensor) for tensor in (grad_out, state, weight)) or not state.mT.is_contiguous():
        return None
    hidden, channels = weight.shape
    tokens = grad_out.numel() // hidden if hidden else 0
    threads = torch.get_num_threads()
    grad_state = _empty_channel_major(state.shape, state) if state_grad else None
    grad_weight = _empty_float32(hidden, channels) if weight_grad else None
    partial = torch.empty(threads, channels, hidden, dtype=torch.float64) if weight_grad else None  # sums
    grad, weight_rows = grad_out.contiguous(), weight.t().contiguous()  # (d_v, d)
    pointers = (*_pointers(grad, state, weight_rows), _pointer(grad_state), _pointer(grad_weight), _pointer(partial))
    load().ddl_channel_mix_backward(*pointers, tokens, hidden, channels, threads)
    return grad_state, grad_weight


def token_mix_step(
    state: torch.Tensor, conv_weight: torch.Tensor, read: torch.Tensor, history: torch.Tensor
) -> torch.Tensor | None:
    """TC's read of one new token per sequence without autograd: `state` `(B, 1, d, d_v)` channel-major, `history`
    `(B, K - 1, d, d_v)` in any layout (the cache's), `conv_weight` `(d * d_v, 1, K)`, `read` `(d_v,)`. Returns
    `(B, 1, d)`, or None where the kernel does not apply. The C++ extension where it is built."""
    cpp = extension()
    if cpp is not None and all(type(tensor) in _PLAIN for tensor in (state, conv_weight, read, history)):
        return cpp.token_mix_step(state, conv_weight, read, history)
    if state.dim() != 4 or state.shape[1] != 1 or conv_weight.dim() != 3 or history.dim() != 4:
        return None
    batch, _, hidden, channels = state.shape
    kernel_size = conv_weight.shape[-1]
    shapes_match = (
        history.shape == (batch, kernel_size - 1, hidden, channels)
        and conv_weight.shape == (hidden * channels, 1, kernel_size)
        and read.shape == (channels,)
    )
    tensors = (state, conv_weight, read, history)
    if not (shapes_match and all(_plain_float32_cpu(tensor) for tensor in tensors)):
        return None
    if not (conv_weight.is_contiguous() and read.is_contiguous() and state.mT.is_contiguous()):
        return None
    out = _empty_float32(batch, 1, hidden)
    pointers = _pointers(state, history, conv_weight, read, out)
    load().ddl_token_mix_step(*pointers, *history.stride(), batch, hidden, channels, kernel_size)
    return out


def expansion_step(window: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor | None:
    """EC of one new token per sequence without autograd: `window` `(B, K, d)` in any layout (the `K - 1` embeddings
    before it, then its own; the cache keeps them time last), `conv_weight` `(d * d_v, 1, K)`. Returns its state
    `(B, 1, d, d_v)`, channel-major, or None where the kernel does not apply. The C++ extension where it is built."""
    cpp = extension()
    if cpp is not None and type(window) in _PLAIN and type(conv_weight) in _PLAIN:
        return cpp.expansion_step(window, conv_weight)
    if window.dim() != 3 or conv_weight.dim() != 3:
        return None
    batch, kernel_size, hidden = window.shape
    if conv_weight.shape[0] % max(hidden, 1) or conv_weight.shape[1:] != (1, kernel_size):
        return None
    if not (_plain_float32_cpu(window) and _plain_float32_cpu(conv_weight) and conv_weight.is_contiguous()):
        return None
    channels = conv_weight.shape[0] // hidden if hidden else 0
    out = _empty_float32(batch, 1, channels, hidden)
    pointers = _pointers(window, conv_weight, out)
    load().ddl_expansion_step(*pointers, *window.stride(), batch, hidden, channels, kernel_size)
    return out.transpose(-1, -2)  # (B, 1, d, d_v), channel-major


def expansion_forward(window: torch.Tensor, taps: torch.Tensor) -> torch.Tensor | None:
    """EC for training in one pass: the states `(B, T, d, d_v)` (channel-major) of the window `(B, K - 1 + T, d)`
    and the taps `(K, d_v, d)` (`delta_ops._expand`), or None where the kernel does not apply."""
    if window.dim() != 3 or taps.dim() != 3 or taps.shape[-1] != window.shape[-1]:
        return None
    if not all(_plain_float32_cpu(tensor) and tensor.is_contiguous() for tensor in (window, taps)):
        return None
    batch, length, hidden = window.shape
    kernel_size, channels = taps.shape[:2]
    seq_len = length - kernel_size + 1
    if seq_len < 0:
        return None
    out = _empty_channel_major(torch.Size((batch, seq_len, hidden, channels)), window)
    sizes = (batch, seq_len, hidden, channels, kernel_size)
    load().ddl_expansion_forward(*_pointers(window, taps, out), *sizes, torch.get_num_threads())
    return out


def expansion_backward(
    grad_out: torch.Tensor, window: torch.Tensor, taps: torch.Tensor, window_grad: bool, taps_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients of `expansion_forward(window, taps)` from the states' gradient `(B, T, d, d_v)` (any layout) in
    one call: the window's (None unless `window_grad`) and the taps' (None unless `taps_grad`). None where the kernel
    does not apply."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if window.dim() != 3 or taps.dim() != 3 or taps.shape[-1] != window.shape[-1]:
        return None
    if not all(_plain_float32_cpu(tensor) and tensor.is_contiguous() for tensor in (window, taps)):
        return None
    batch, length, hidden = window.shape
    kernel_size, channels = taps.shape[:2]
    seq_len = length - kernel_size + 1
    if not _plain_float32_cpu(grad_out) or grad_out.shape != (batch, seq_len, hidden, channels):
        return None
    grad = grad_out.transpose(-1, -2).contiguous()  # (B, T, d_v, d): a copy only if not channel-major
    threads = torch.get_num_threads()
    grad_window = _empty_float32(batch, length, hidden) if window_grad else None
    grad_taps = _empty_float32(kernel_size, channels, hidden) if taps_grad else None
    partial = torch.empty(threads, kernel_size, channels, hidden, dtype=torch.float64) if taps_grad else None
    pointers = (*_pointers(grad, window, taps), _pointer(grad_window), _pointer(grad_taps), _pointer(partial))
    load().ddl_expansion_backward(*pointers, batch, seq_len, hidden, channels, kernel_size, threads)
    return grad_window, grad_taps


def _token_conv_sizes(window: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, ...] | None:
    """`(B, L, d, d_v, K, padding)` of TC's token convolution of a contiguous channel-major window `(B, L, d_v, d)`
    with a kernel `(K, d_v, d)` (see `delta_ops._token_conv`), or None where the kernels do not take them."""
    if window.dim() != 4 or weight.dim() != 3 or weight.shape[1:] != window.shape[2:] or padding < 0:
        return None
    if not (all(_plain_float32_cpu(tensor) for tensor in (window, weight)) and window.is_contiguous()):
        return None
    batch, length, channels, hidden = window.shape
    kernel_size = weight.shape[0]
    if length + padding - kernel_size + 1 < 0:
        return None
    return batch, length, hidden, channels, kernel_size, padding


def token_conv_forward(window: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor | None:
    """TC's token convolution `(B, L + padding - K + 1, d)` in one call (`delta_ops._token_conv`: `padding` zero
    tokens before the window), or None where the kernel does not apply."""
    sizes = _token_conv_sizes(window, weight, padding)
    if sizes is None:
        return None
    batch, length, hidden, _, kernel_size, _ = sizes
    out, weight = _empty_float32(batch, length + padding - kernel_size + 1, hidden), weight.contiguous()
    load().ddl_token_conv_forward(*_pointers(window, weight, out), *sizes, torch.get_num_threads())
    return out


def token_conv_backward(
    grad_out: torch.Tensor,
    window: torch.Tensor,
    weight: torch.Tensor,
    padding: int,
    window_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients of `token_conv_forward(window, weight, padding)` from the output's gradient in one call: the
    window's (None unless `window_grad`) and the kernel's (None unless `weight_grad`). None where the kernel does not
    apply."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    sizes = _token_conv_sizes(window, weight, padding)
    if sizes is None:
        return None
    batch, length, hidden, channels, kernel_size, _ = sizes
    if not _plain_float32_cpu(grad_out) or grad_out.shape != (batch, length + padding - kernel_size + 1, hidden):
        return None
    threads = torch.get_num_threads()
    grad_window = _empty_float32(*window.shape) if window_grad else None
    grad_weight = _empty_float32(*weight.shape) if weight_grad else None
    partial = torch.empty(threads, *weight.shape, dtype=torch.float64) if weight_grad else None
    grad, weight = grad_out.contiguous(), weight.contiguous()  # kept alive until the call returns
    pointers = (*_pointers(grad, window, weight), _pointer(grad_window), _pointer(grad_weight))
    load().ddl_token_conv_backward(*pointers, _pointer(partial), *sizes, threads)
    return grad_window, grad_weight
