"""Compiled CPU kernels (selective scan, depthwise causal conv): ``cpu_kernels.c`` built once per machine.

Why: the blocked PyTorch scan spends most of its time in per-step dispatch and in passes over (b, d, n)
tensors in memory; one fused C loop keeps a sample's state in L1 and does softplus, exp, the update, the
C contraction, the D skip and the silu(z) gate in one pass (with d_state 16, the Vim family's, a specialised
loop: see the comment at the top of ``cpu_kernels.c``). The conv kernel reads Vim's transposed views in
place and writes token-major output, which the next projection reads without a copy (Vim-Ti forward on 2
cores: see ``benchmarks/results/cpu_forward.md``). The library needs no PyTorch headers, so it builds in about a
second; it is cached under ``$XDG_CACHE_HOME/mambatrim`` (or ``~/.cache/mambatrim``), keyed by the source, the flags
and the CPU, and loaded with ctypes. Where no compiler is found or the build fails, :func:`unavailable_reason`
says why and callers keep the PyTorch ops. Inference only (no autograd), fp32 math on any strides. Whether they
run is the ``cpu_kernels`` setting of :mod:`mambatrim.ops.policy` (:func:`compiled_applies`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from . import policy

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAG_SETS = (  # tried in order: the first that builds wins
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (so a shared cache never mixes CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(wanted))) or platform.processor()
    except OSError:
        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mambatrim"


def _build(compiler: str, flag_sets: tuple[tuple[str, ...], ...] = _FLAG_SETS) -> tuple[Path | None, str]:
    """The cached library built with the first flag set that compiles, or (None, why)."""
    source = _SOURCE.read_bytes()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(source + " ".join((compiler, *flags)).encode() + _cpu_id().encode()).hexdigest()[:16]
        target = _cache_dir() / f"cpu_kernels_{key}.so"
        if target.exists():
            return target, ""
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler, *flags, "-std=gnu11", "-shared", "-fPIC", str(_SOURCE), "-o", str(out), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders never load a half-written file
                return target, ""
            errors.append(proc.stderr.strip().splitlines()[-1:] or ["failed"])
    return None, f"{compiler} could not build {_SOURCE.name}: {errors[0][0]}"


LOG2E = 1.4426950408889634  # the scan kernel takes A * log2(e): exp(x) = 2^(x log2 e)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return None, "no C compiler found (set CC or install gcc/clang)"
    try:
        path, why = _build(compiler)
        if path is None:
            return None, why
        return _load(path), ""
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"building or loading the compiled CPU kernels failed: {err}"


def _load(path: Path) -> ctypes.CDLL:
    """The built library with its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    lib.mambatrim_scan_fwd.restype = ctypes.c_int32
    strides = ctypes.POINTER(ctypes.c_int64)
    lib.mambatrim_scan_fwd.argtypes = ([ctypes.c_int64] * 5 + [ctypes.c_void_p] * 12 + [strides] + [ctypes.c_int32] * 2
                                       + [ctypes.c_float] + [ctypes.c_int32] * 2)
    lib.mambatrim_conv_fwd.restype = None
    lib.mambatrim_conv_fwd.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 4 + [strides] + [ctypes.c_int32] * 3
    lib.mambatrim_add_rms_norm.restype = None
    lib.mambatrim_add_rms_norm.argtypes = ([ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_float]
                                           + [ctypes.c_void_p] * 2 + [ctypes.c_int32])
    return lib


def unavailable_reason() -> str:
    """'' when the compiled kernels are ready (building them on the first call), else why not."""
    return _library()[1]


def compiled_applies(device: torch.device, needs_grad: bool) -> bool:
    """Whether the compiled kernels run: CPU inference, per the ``cpu_kernels`` setting (see ops.policy)."""
    choice = policy.get("cpu_kernels")
    if needs_grad or device.type != "cpu" or choice == "torch":
        return False
    why = unavailable_reason()
    if why and choice == "compiled":
        raise RuntimeError(f"cpu_kernels='compiled' but the compiled CPU kernels are not available: {why}; "
                           "use cpu_kernels='auto' or 'torch'")
    return not why


def _lib() -> ctypes.CDLL:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the compiled CPU kernels are not available: {why}")
    return lib


def _strides(*tensors: Tensor | None) -> ctypes.Array:
    """Every tensor's strides in one int64 array (zeros for a missing one)."""
    flat = [x for t in tensors for x in (t.stride() if t is not None else (0, 0, 0))]
    return (ctypes.c_int64 * len(flat))(*flat)


def _fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    gap: Tensor | None = None,
    *,
    dt_weight: Tensor | None = None,
    scale: float = 1.0,
    add_to: Tensor | None = None,
    weight: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Same contract as :func:`mambatrim.ops.scan_ref.selective_scan_ref`; CPU tensors, no autograd.

    The output is (b, d, L) viewed on (b, L, d) memory: the token-major layout the mixer's ``out_proj`` reads.
    Extras for a mixer's paths, all folded into the one pass over the sequence:

    * ``dt_weight`` (d, R): ``delta`` is then dt_proj's low-rank input (b, R, L) and the kernel forms
      ``delta = dt_weight @ delta`` per step (no (b, d, L) delta in memory, no thin matmul);
    * ``scale``: the output is ``scale * y``;
    * ``add_to``: a previous output of this function (fp32, same shape), into which ``scale * y`` is added in
      place and which is returned: several paths summed or averaged without a separate combine;
    * ``weight`` (b,): per-sample multipliers of the output (a path's gates); a sample weighted 0 is not scanned;
    * ``out_dtype``: the output's dtype (default u's; fp32 to pass it on as ``add_to``).
    """
    lib = _lib()
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu runs on CPU tensors, got device {u.device}")
    bsz, dim, length = u.shape
    nst = A.shape[1]
    rank = 0
    if dt_weight is not None:
        rank = dt_weight.shape[1]
        if dt_weight.shape != (dim, rank) or delta.shape != (bsz, rank, length):
            raise ValueError(f"selective_scan_cpu: dt_weight {tuple(dt_weight.shape)} must be (d, R) = ({dim}, R) "
                             f"and delta then the low-rank input (b, R, L) = ({bsz}, {rank}, {length}), got "
                             f"{tuple(delta.shape)}")
    uf, dt, Bf, Cf, zf, gf = (_fp32(t) for t in (u, delta, B, C, z, gap))
    # (d_state, dim): one vector load per state and channel block; log2(e) folded in (the kernel takes 2^x)
    At2 = (A.detach().float() * LOG2E).t().contiguous()
    Df = None if D is None else D.detach().float().contiguous()
    bias = None if delta_bias is None else delta_bias.detach().float().contiguous()
    wdt = None if dt_weight is None else dt_weight.detach().float().t().contiguous()  # (R, dim)
    if weight is not None and weight.shape != (bsz,):
        raise ValueError(f"selective_scan_cpu: weight must be per sample, ({bsz},), got {tuple(weight.shape)}")
    wf = None if weight is None else weight.detach().float().contiguous()
    if add_to is None:
        y = u.new_empty(bsz, length, dim, dtype=torch.float32).transpose(1, 2)
    elif add_to.shape != u.shape or add_to.dtype != torch.float32 or add_to.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu: add_to must be a float32 CPU tensor of shape {tuple(u.shape)}, got "
                         f"{add_to.dtype} {tuple(add_to.shape)} on {add_to.device}")
    else:
        y = add_to
    s = _strides(uf, dt, zf, Bf, Cf, y, gf)  # the order cpu_kernels.c reads them in
    status = lib.mambatrim_scan_fwd(bsz, dim, length, nst, rank, _ptr(uf), _ptr(dt), _ptr(wdt), _ptr(At2),
                                    _ptr(Bf), _ptr(Cf), _ptr(Df), _ptr(zf), _ptr(bias), _ptr(gf), _ptr(wf), _ptr(y), s,
                                    int(delta_softplus), int(reverse), float(scale), int(add_to is not None),
                                    torch.get_num_threads())
    if status != 0:
        raise MemoryError("selective_scan_cpu: could not allocate the scan state")
    return y if add_to is not None else y.to(out_dtype or u.dtype)


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, reverse: bool) -> Tensor:
    """:func:`mambatrim.ops.conv.causal_conv1d` on CPU tensors without autograd; weight (d, k).

    The output is (b, d, L) viewed on (b, L, d) memory: the token-major layout the mixer's ``x_proj`` reads.
    """
    lib = _lib()
    bsz, dim, length = x.shape
    xf = x.detach().float()
    wt = weight.detach().float().reshape(dim, -1).t().contiguous()  # (k, d)
    bf = None if bias is None else bias.detach().float().contiguous()
    y = x.new_empty(bsz, length, dim, dtype=torch.float32).transpose(1, 2)
    lib.mambatrim_conv_fwd(bsz, dim, length, wt.shape[0], _ptr(xf), _ptr(wt), _ptr(bf), _ptr(y),
                           _strides(xf, y), int(reverse), int(silu), torch.get_num_threads())
    return y.to(x.dtype)


def add_rms_norm_cpu(hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Vim's fused add-norm in one pass over the rows: ``r = hidden + residual`` (or ``hidden``), returns
    ``(rms_norm(r) * weight, r)``. fp32 CPU tensors, contiguous rows, no autograd (see ``RMSNorm.add_and_norm``)."""
    lib = _lib()
    dim = hidden.shape[-1]
    h = hidden.detach().contiguous()
    r = None if residual is None else residual.detach().contiguous()
    if h.dtype != torch.float32 or (r is not None and (r.dtype != torch.float32 or r.shape != h.shape)):
        raise ValueError(f"add_rms_norm_cpu takes fp32 hidden and residual of one shape, got {h.dtype} "
                         f"{tuple(h.shape)} and {None if r is None else (r.dtype, tuple(r.shape))}")
    w = weight.detach().float().contiguous()
    out, res = torch.empty_like(h), torch.empty_like(h)
    lib.mambatrim_add_rms_norm(h.numel() // dim, dim, _ptr(h), _ptr(r), _ptr(w), float(eps), _ptr(out), _ptr(res),
                               torch.get_num_threads())
    return out, res
