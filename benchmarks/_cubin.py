"""Compile Triton kernels for a GPU that is not there, and read what ``ptxas`` and the SASS say.

* :class:`StandInDriver` answers Triton's driver queries (target, device, stream) for a fixed
  target such as ``sm_90a``, so ``JITFunction.warmup`` compiles on a CPU-only machine (nothing
  is loaded or launched).
* :func:`ptxas_usage` runs the ``ptxas`` that Triton bundles with ``-v`` on a kernel's PTX:
  registers, spill stores/loads, stack frame.
* :func:`sass_loops` finds the loops of the SASS (``cuobjdump -sass``, bundled too): each backward
  branch closes one; it counts the instructions of one iteration and the matrix instructions in it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA", "QGMMA")


class StandInDriver:
    """Triton's active driver for compiling only: a fixed CUDA target, device 0, stream 0."""

    def __init__(self, arch: int = 90, warp_size: int = 32) -> None:
        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)

    def is_active(self) -> bool:
        return True

    def install(self) -> StandInDriver:
        driver.set_active(self)
        return self


def triton_tool(name: str) -> str:
    """Path of a CUDA tool bundled with Triton (``ptxas``, ``cuobjdump``), else from ``PATH``."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not bundled with Triton at {bundled} and not on PATH")
    return found


@dataclass
class PtxasUsage:
    """``ptxas -v`` of one kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    log: str

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def ptxas_usage(ptx: str, arch: str = "sm_90a") -> PtxasUsage:
    """Run the bundled ``ptxas -v`` (Triton's own flags) on ``ptx``; raises ``RuntimeError`` on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [triton_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v: no register/spill report in {log[-2000:]!r}")
    return PtxasUsage(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)),
                      int(stack.group(1)) if stack else 0, log)


def sass_of(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        proc = subprocess.run([triton_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr[-2000:]}")
    return proc.stdout


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)


@dataclass(frozen=True)
class Loop:
    """One SASS loop: ``[start, end]`` byte addresses (end: the backward branch)."""

    start: int
    end: int
    instructions: int  # per iteration, NOPs excluded
    mma: int  # matrix instructions per iteration (HGMMA/HMMA/DMMA/...)
    wgmma: int  # HGMMA per iteration
    innermost: bool
    loads: int = 0  # global loads (LDG, LDGSTS) per iteration
    barriers: int = 0  # block-wide barriers (BAR.SYNC/BAR.RED, not dependency barriers) per iteration


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` pairs of a SASS listing (predicate kept, control words dropped)."""
    return [(int(a, 16), text) for a, text in _INSTR.findall(sass)]


def sass_loops(sass: str) -> list[Loop]:
    """Every loop closed by a backward ``BRA``, with per-iteration counts, outermost last."""
    instrs = parse_sass(sass)
    spans = []
    for addr, text in instrs:
        m = re.search(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`?\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    loops = []
    for start, end in spans:
        body = [t for a, t in instrs if start <= a <= end]
        ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
        inner = not any(s != start or e != end for s, e in spans if start <= s and e <= end and (s, e) != (start, end))
        loops.append(Loop(start, end, sum(not o.startswith("NOP") for o in ops),
                          sum(o.startswith(MMA_OPS) for o in ops), sum(o.startswith("HGMMA") for o in ops), inner,
                          sum(o.startswith("LDG") for o in ops), sum(o.startswith("BAR.") for o in ops)))
    return sorted(loops, key=lambda lp: lp.end - lp.start)


def main_loops(sass: str) -> list[Loop]:
    """The innermost loops that hold matrix instructions (one per unrolled copy of a main loop);
    in a kernel without any, the innermost loops that load from global memory."""
    inner = [lp for lp in sass_loops(sass) if lp.innermost]
    return [lp for lp in inner if lp.mma > 0] or [lp for lp in inner if lp.loads > 0]


def count_ops(sass: str, prefix: str) -> int:
    """Instructions of ``sass`` whose opcode starts with ``prefix``."""
    total = 0
    for _, text in parse_sass(sass):
        op = text.split()[1] if text.startswith("@") else text.split()[0]
        total += op.startswith(prefix)
    return total
