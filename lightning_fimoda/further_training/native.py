"""The MLP kernel's compiled step (``mlp_step.c``): one fused forward/backward pass per member.

Built on first use in each process with the system C compiler (``$CC``, else ``cc``; under a second,
into a temporary directory removed once loaded: nothing is cached across processes, so a changed source
or CPU can never load a stale build), with ``-O3 -march=native -fopenmp`` (dropping the flags the
compiler refuses). Its products call the BLAS ``sgemm_`` / ``dgemm_`` that torch itself links (MKL in
the x86_64 wheels), found in ``libtorch_cpu``. With ``T > 1`` torch threads the members are split over
``T`` threads of torch's own OpenMP pool (torch's ``libgomp``, already loaded, serves the library), the
BLAS sequential inside them; built without OpenMP, the step runs on one thread only.
``FIMODA_NATIVE=0`` in the environment disables it (read at every call). When it cannot be built or
loaded, :func:`load` says why and :class:`~lightning_fimoda.further_training.mlp.MLPKernel` keeps its
``torch.bmm`` path (same numbers up to rounding; both tested against ``torch.func``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CompiledStep", "NativeStep", "load"]

_SOURCE = Path(__file__).with_name("mlp_step.c")
_TYPES = {torch.float32: ("f32", "float", "sgemm_"), torch.float64: ("f64", "double", "dgemm_")}
_P, _I = ctypes.c_void_p, ctypes.c_int64
_CODES = {nn.ReLU: 1, nn.LeakyReLU: 2, nn.Tanh: 3, nn.Sigmoid: 4}  # mlp_step.c's activation codes
_MAX_LAYERS = 64  # mlp_step.c's MAX_LAYERS


@dataclass(frozen=True)
class NativeStep:
    """The loaded library: ``step[dtype]`` the C function, ``gemm[dtype]`` the BLAS routine's address,
    ``parallel`` whether it was built with OpenMP (members split over torch's threads)."""

    step: dict[torch.dtype, ctypes._CFuncPtr]
    gemm: dict[torch.dtype, int]
    parallel: bool


def load() -> tuple[NativeStep | None, str | None]:
    """``(library, None)``, or ``(None, why it is unavailable)``; built once per process."""
    if os.environ.get("FIMODA_NATIVE", "1") == "0":
        return None, "disabled by FIMODA_NATIVE=0"
    return _load()


@functools.cache
def _load() -> tuple[NativeStep | None, str | None]:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "no C compiler ($CC or cc) on PATH"
    try:
        blas = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        gemm = {dt: ctypes.cast(getattr(blas, name), _P).value for dt, (_, _, name) in _TYPES.items()}
    except (OSError, AttributeError) as err:
        return None, f"torch's BLAS gemm was not found ({err})"
    with tempfile.TemporaryDirectory(prefix="fimoda-native-") as tmp:
        library = Path(tmp) / "mlp_step.so"
        why = _build(compiler, library)
        if why is not None:
            return None, why
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as err:  # e.g. a temporary directory mounted noexec
            return None, f"the built {library.name} could not be loaded ({err})"
    step = {}
    for dt, (suffix, _, _) in _TYPES.items():
        fn = getattr(lib, f"mlp_step_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _I, _I, _P, _I, _P, _P]
        step[dt] = fn
    return NativeStep(step, gemm, bool(lib.mlp_step_parallel_f32())), None


def _build(compiler: str, library: Path) -> str | None:
    """Compile both precisions into ``library`` (with ``-march=native`` and ``-fopenmp`` where the compiler
    takes them); ``None``, or the compiler's complaint."""
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        objects, error = [], None
        for suffix, real, _ in _TYPES.values():
            obj = library.with_name(f"{suffix}.o")
            flags = [f"-DREAL={real}", f"-DNAME(x)=x##_{suffix}", "-O3", "-fPIC", "-std=c99", *extra]
            error = _run([compiler, *flags, "-c", str(_SOURCE), "-o", str(obj)])
            if error is not None:
                break
            objects.append(str(obj))
        if error is None:
            omp = [f for f in extra if f == "-fopenmp"]
            error = _run([compiler, "-shared", *omp, *objects, "-o", str(library), "-lm"])
            if error is None:
                return None
    return f"{compiler} could not build {_SOURCE.name}: {error}"


def _run(command: list[str]) -> str | None:
    """Run a compiler command: ``None``, or the end of its complaint."""
    try:
        done = subprocess.run(command, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()[-500:]


class CompiledStep:
    """``mlp_step.c`` for one model's layers (the kernel's ``_Block`` list) and loss (``"mse"`` or
    ``"cross_entropy"``); :attr:`unavailable` says why it cannot run (``None`` when it can)."""

    def __init__(self, blocks: list[Any], loss: str) -> None:
        self.loss = loss
        self.layers = _layers(blocks)
        self._scratch: Tensor | None = None
        if not isinstance(self.layers, str):
            dims, acts, slopes, weights, _ = self.layers
            self._shape = (  # the C arguments that never change: layers, widths, activations, slopes
                len(weights), (_I * len(dims))(*dims), (_I * len(acts))(*acts),
                (ctypes.c_double * len(slopes))(*slopes),
            )  # fmt: skip

    @property
    def unavailable(self) -> str | None:
        return self.layers if isinstance(self.layers, str) else load()[1]

    def usable(self, like: Tensor) -> bool:
        """Whether it runs for ``like``'s device and dtype at torch's current thread count."""
        if like.device.type != "cpu" or like.dtype not in _TYPES or self.unavailable is not None:
            return False
        return torch.get_num_threads() == 1 or load()[0].parallel

    def __call__(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        w: Tensor | None,
        value: Tensor,
        grads: dict | None,
    ) -> None:
        """On ``x [K, R, d_in]`` (float32/float64, CPU) and targets ``y [K, R, ...]``: with row weights
        ``w [K, R]``, ``value [K] = Σ_r w ℓ`` and its gradients into the ``grads`` buffers (like
        ``params``, contiguous); without (``None``), the per-row losses ``value [K, R]``."""
        lib, dtype = load()[0], x.dtype
        k, r = x.shape[:2]
        dims, _, _, weights, biases = self.layers
        if self.loss == "mse":
            if y.reshape(k, r, -1).shape[-1] != dims[-1]:
                raise ValueError(
                    f"SupervisedTask(mse): outputs of width {dims[-1]} and targets {tuple(y.shape)} differ."
                )
            y = _rows(y.reshape(k, r, -1).to(dtype))
        else:
            y = _rows(y.reshape(k, r, 1).long())
        x, w = _rows(x), None if w is None else _rows(w.unsqueeze(-1))
        wrong = [n for n, t in params.items() if t.dtype != dtype or t.device != x.device]
        if wrong or (w is not None and w.dtype != dtype):
            raise ValueError(f"The compiled step needs every tensor in {dtype} on the CPU; {wrong or 'w'} differ.")
        p = {n: t if t.is_contiguous() else t.contiguous() for n, t in params.items()}
        threads, size = min(k, torch.get_num_threads()), r * (sum(dims[1:]) + 2 * max(dims) + 1)
        if self._scratch is None or self._scratch.numel() < threads * size or self._scratch.dtype != dtype:
            self._scratch = x.new_empty(threads * size)
        code = lib.step[dtype](
            lib.gemm[dtype], k, threads, r, *self._shape, _pointers(p, weights), _pointers(p, biases),
            _pointers(grads, weights), _pointers(grads, biases), x.data_ptr(), x.stride(0), y.data_ptr(),
            y.stride(0), 0 if self.loss == "mse" else 1, None if w is None else w.data_ptr(),
            0 if w is None else w.stride(0), value.data_ptr(), self._scratch.data_ptr(),
        )  # fmt: skip
        if code == -1:
            raise ValueError(f"SupervisedTask(cross_entropy): a label is outside [0, {dims[-1]}).")
        if code:
            raise RuntimeError(f"mlp_step.c failed with code {code}")


def _layers(blocks: list[Any]) -> tuple | str:
    """``(dims, activation codes, slopes, weight names, bias names)``, or why these layers need the
    ``bmm`` path (activations on the inputs, two in a row, a negative LeakyReLU slope, over 64 layers)."""
    if blocks[0].weight is None:
        return "the model has an activation before its first Linear layer"
    if len(blocks) > _MAX_LAYERS:
        return f"the model has more than {_MAX_LAYERS} Linear layers"
    acts, slopes = [], []
    for block in blocks:
        if len(block.acts) > 1:
            return "the model has two activations in a row"
        act = block.acts[0] if block.acts else None
        slope = float(getattr(act, "negative_slope", 0.0))
        if slope < 0:
            return "a LeakyReLU has a negative slope"
        acts.append(_CODES[type(act)] if act is not None else 0)
        slopes.append(slope)
    dims = [blocks[0].inp, *(b.out for b in blocks)]
    return dims, acts, slopes, [b.weight for b in blocks], [b.bias for b in blocks]


def _rows(t: Tensor) -> Tensor:
    """``t [K, R, d]`` with each member's ``[R, d]`` rows contiguous (any member stride, 0 included)."""
    d = t.shape[-1]
    return t if t.stride(-1) == 1 and (t.stride(-2) == d or t.shape[-2] == 1) else t.contiguous()


def _pointers(tensors: dict[str, Tensor] | None, names: list[str | None]) -> Any:
    """A C array of the named tensors' data pointers (NULL for a missing name or no tensors)."""
    return (_P * len(names))(*[tensors[n].data_ptr() if tensors and n else None for n in names])
