"""What each launch of a decode step occupies on an NVIDIA SM, found without a GPU.

Kernel work on a lent GPU is metered in minutes, and several questions about a launch need no GPU at all: how much
shared memory and how many registers a program takes, whether Triton pipelined its loads (``cp.async``) or sent
them through registers, whether two kernels' programs can sit on one SM together (programmatic dependent launch
overlaps them only then), and whether two programs of one launch can share an SM (a one-program-per-SM layout
such as ``_dims_stream_kernel`` assumes they do not). This module answers them by

1. running a step's launchers on ``meta`` tensors with every kernel of :mod:`.decode` replaced by a recorder
   (``record_launches``): the launches come out with the grids, arguments, constexprs and options the launchers
   chose for that shape -- no copy of their logic to drift from it;
2. compiling each launch for the target offline (``compile_launch``), specialized the way Triton's JIT specializes
   a call (pointers 16-byte aligned, integers divisible by 16 flagged, integers equal to 1 folded): without those
   hints Triton neither vectorizes nor pipelines the loads, and the report would describe another kernel;
3. reading shared memory from the compiled kernel, registers and local (spill) bytes from the cubin through the
   ``cuobjdump`` that Triton ships, and counting the PTX's asynchronous copies and matrix instructions.

Needs Triton with its NVIDIA backend (the ``kernels`` extra); no GPU, no CUDA driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import decode


@dataclass(frozen=True)
class SMLimits:
    """One SM's budget (Hopper, compute capability 9.0: the H100 and H200)."""

    shared: int = 228 * 1024  # bytes of shared memory an SM holds
    shared_per_cta: int = 227 * 1024  # the most one program may take
    reserved_per_cta: int = 1024  # taken by the system for every resident program
    registers: int = 65536
    threads: int = 2048
    ctas: int = 32


HOPPER = SMLimits()


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel, its grid, every parameter's value, the launch options."""

    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]
    options: dict[str, Any]
    fn: Any = field(repr=False, default=None)


@dataclass
class Resources:
    """What one launch's program takes on an SM (``None`` where the tool that tells was not found)."""

    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int | None
    shared: int  # bytes of shared memory a program
    registers: int | None  # a thread
    local: int | None  # bytes of local memory (spills, stack) a thread
    async_copies: int  # cp.async and bulk copies in the PTX: the loads were pipelined through shared memory
    mma: int  # mma.sync instructions
    wgmma: int  # wgmma instructions (Hopper's warpgroup matrix unit)
    ctas_per_sm: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _warp_registers(registers: int | None) -> int:
    """Registers a warp is given: a thread's count times 32, in 256s."""
    return -(-(registers or 0) * 32 // 256) * 256


def ctas_per_sm(shared: int, registers: int | None, num_warps: int, sm: SMLimits = HOPPER) -> int:
    """Programs of one launch an SM can hold at once, the least of what shared memory, registers, threads and the
    program limit allow."""
    if shared > sm.shared_per_cta:
        return 0
    limits = [sm.ctas, sm.threads // (32 * num_warps), sm.shared // (shared + sm.reserved_per_cta)]
    if registers:
        limits.append((sm.registers // _warp_registers(registers)) // num_warps)
    return max(0, min(limits))


def fit_together(a: Resources, b: Resources, sm: SMLimits = HOPPER) -> bool:
    """Whether one program of ``a`` and one of ``b`` fit on one SM at once (the overlap that programmatic dependent
    launch allows, or two programs of one launch when ``a is b``)."""
    shared = a.shared + b.shared + 2 * sm.reserved_per_cta
    threads = 32 * (a.num_warps + b.num_warps)
    regs = sum(_warp_registers(r.registers) * r.num_warps for r in (a, b))
    return shared <= sm.shared and threads <= sm.threads and regs <= sm.registers


# -- recording ----------------------------------------------------------------------------------------
_OPTION_NAMES = ("num_warps", "num_stages", "launch_pdl", "maxnreg", "num_ctas")


class _Recorder:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records a ``Launch``."""

    def __init__(self, name: str, fn: Any, log: list[Launch]):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            names = self.fn.arg_names
            values = dict(zip(names, args))
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
            values.update(kwargs)
            self.log.append(Launch(self.name, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,), values,
                                   options, self.fn))
        return launch


def _kernels() -> dict[str, Any]:
    return {name: obj for name, obj in vars(decode).items() if name.endswith("_kernel") and hasattr(obj, "arg_names")}


@contextlib.contextmanager
def recording(sms: int = 132, pdl: bool = True) -> Iterator[list[Launch]]:
    """Within the block, the kernels of :mod:`.decode` record their launches instead of running, as on a GPU of
    ``sms`` SMs with (``pdl``) programmatic dependent launch; run the step on ``meta`` tensors."""
    if decode.triton is None:
        raise RuntimeError("recording launches needs the 'triton' package (pip install triton)")
    log: list[Launch] = []
    saved = {name: getattr(decode, name) for name in ("_sms", "use_pdl")}
    kernels = _kernels()
    try:
        for name, fn in kernels.items():
            setattr(decode, name, _Recorder(name, fn, log))
        decode._sms = lambda device: sms
        decode.use_pdl = lambda device, flag=None: pdl and flag is not False
        yield log
    finally:
        for name, fn in kernels.items():
            setattr(decode, name, fn)
        for name, obj in saved.items():
            setattr(decode, name, obj)


def record_launches(step: Callable[[], Any], sms: int = 132, pdl: bool = True) -> list[Launch]:
    """The launches one call of ``step`` makes (see ``recording``)."""
    with recording(sms, pdl) as log:
        step()
    return log


# -- compiling ----------------------------------------------------------------------------------------
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
           torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


def _specialize(launch: Launch) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as Triton's JIT would derive them from the call's values."""
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(launch.fn.params):
        name = param.name
        has = name in launch.args
        value = launch.args[name] if has else param.default
        if param.is_constexpr or not has or value is None:
            sig[name] = "constexpr"
            consts[name] = value if has or param.has_default else None
            continue
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _DTYPES[value.dtype]
            if (value.storage_offset() * value.element_size()) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel}: cannot specialize parameter {name} of type {type(value).__name__}")
    return sig, consts, attrs


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _cubin_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and local bytes a thread, from ``cuobjdump --dump-resource-usage`` (None, None without it)."""
    tool = _cuobjdump()
    if tool is None or not cubin:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    spill = (int(local.group(1)) if local else 0) + (int(stack.group(1)) if stack else 0)
    return (int(reg.group(1)) if reg else None), (spill if reg else None)


def compile_kernel(launch: Launch, capability: int = 90) -> Any:
    """One recorded launch compiled for ``sm_{capability}`` offline (Triton's ``CompiledKernel``: asm, metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.compiler import ASTSource

    sig, consts, attrs = _specialize(launch)
    known = {f.name for f in dataclasses.fields(CUDAOptions)}
    options = {k: v for k, v in launch.options.items() if k in known}
    return triton.compile(ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32), options=options)


def normalized_ptx(kernel: Any) -> str:
    """A compiled kernel's PTX without what moves when only the source does: the debug sections, ``.loc``/``.file``
    lines, comments and the numbering of temporary labels. Two trees whose kernels give the same text here run the
    same instructions (what a refactor should leave alone)."""
    lines = []
    for line in kernel.asm.get("ptx", "").splitlines():
        if re.match(r"\s*\.section\s+\.debug", line):
            break
        text = line.strip()
        if text.startswith((".loc", ".file", "//")) or re.fullmatch(r"\$L__tmp\d+:", text):
            continue
        lines.append(re.sub(r"\$L__tmp\d+", "$L__tmp", line))
    return "\n".join(lines)


def compile_launch(launch: Launch, capability: int = 90, sm: SMLimits = HOPPER) -> Resources:
    """Compile one recorded launch for ``sm_{capability}`` offline and read what its program takes."""
    kernel = compile_kernel(launch, capability)
    ptx = kernel.asm.get("ptx", "")
    registers, local = _cubin_usage(kernel.asm.get("cubin", b""))
    num_warps = launch.options.get("num_warps", 4)
    shared = int(kernel.metadata.shared)
    return Resources(
        kernel=launch.kernel, grid=launch.grid, num_warps=num_warps, num_stages=launch.options.get("num_stages"),
        shared=shared, registers=registers, local=local,
        async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        ctas_per_sm=ctas_per_sm(shared, registers, num_warps, sm),
    )


def _key(launch: Launch) -> str:
    sig, consts, attrs = _specialize(launch)
    return repr((launch.kernel, sorted(sig.items()), sorted((k, repr(v)) for k, v in consts.items()), sorted(attrs),
                 sorted(launch.options.items())))


def step_resources(step: Callable[[], Any], sms: int = 132, capability: int = 90,
                   cache: dict[str, Resources] | None = None) -> list[Resources]:
    """Every launch of one call of ``step`` (run on ``meta`` tensors), compiled, in launch order; ``cache`` keeps
    compiled launches across calls (the same specialization compiles once)."""
    cache = {} if cache is None else cache
    out = []
    for launch in record_launches(step, sms):
        key = _key(launch)
        if key not in cache:
            cache[key] = compile_launch(launch, capability)
        out.append(dataclasses.replace(cache[key], grid=launch.grid))
    return out
