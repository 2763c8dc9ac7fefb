"""Run-time instruction-set dispatch of the C++ kernels (csrc/cpu_capability.cpp, the units of csrc/cpu/).

``ATEN_CPU_CAPABILITY`` forces our kernels and ATen's alike, ``_set_cpu_capability`` refuses unknown or
unsupported levels, every level drops exactly the contract's dropout mask, and (x86-64 with objdump) AVX
code stands only in the per-level units.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpp_cases import LEVELS

import rollingq_kernels
from rollingq_kernels import rollingq_attention

if rollingq_kernels.HAS_CPP:
    from rollingq_kernels import _C


pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")


_REPORT_LEVELS = (
    "import warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "from rollingq_kernels import _C\n"
    "print(_C.cpu_capability(), torch.backends.cpu.get_cpu_capability())\n"
)


def _levels_in_subprocess(value):
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if value is not None:
        env["ATEN_CPU_CAPABILITY"] = value
    res = subprocess.run([sys.executable, "-c", _REPORT_LEVELS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split(), res.stderr


def test_aten_cpu_capability_forces_the_kernels_and_aten_alike():
    best = LEVELS[-1]
    assert _levels_in_subprocess(None)[0][0] == best  # unset: the best level the CPU runs
    for level in LEVELS:
        (ours, aten), _ = _levels_in_subprocess(level)
        assert ours == level and aten == level.upper()
    (ours, _), err = _levels_in_subprocess("sse9")  # ATen's rule: an unknown value is ignored, with a warning
    # our own warning (cpu_capability.cpp), not ATen's, which says the same without the prefix
    assert ours == best and "rollingq: ignoring invalid value for ATEN_CPU_CAPABILITY: sse9" in err


def test_set_cpu_capability_rejects_unknown_or_unsupported_levels():
    with pytest.raises(ValueError, match=r"^name: expected 'default', 'avx2' or 'avx512', got 'avx1024'"):
        _C._set_cpu_capability("avx1024")
    with pytest.raises(TypeError, match=r"^name: expected a str"):
        _C._set_cpu_capability(2)
    for level in {"default", "avx2", "avx512"} - set(LEVELS):
        with pytest.raises(ValueError, match=rf"cannot run '{level}' kernels"):
            _C._set_cpu_capability(level)


@pytest.mark.parametrize("class_only", [False, True])
def test_every_level_drops_exactly_the_contract_mask(class_only, cpu_level):
    # v = the identity (N <= Dh), so out[b, h, i, j] = P_d[b, h, i, j]: zero exactly where dropped.
    B, H, segs, p = 2, 3, [13, 19], 0.4  # N = 33: every vector width (4, 8, 16) leaves a tail
    N = 1 + sum(segs)
    q = torch.randn(B, H, 1 if class_only else N, N)
    k = torch.randn(B, H, N, N)
    v = torch.eye(N).expand(B, H, N, N).contiguous()
    out, _ = rollingq_attention(q, k, v, segs, dropout_p=p, seed=1234, backend="cpp", compute_stats=False)
    keep = rollingq_kernels.dropout_mask(1234, B, H, q.shape[2], N, p)
    assert torch.equal(out != 0, keep)


# where a level's code lives: our units' namespaces and ATen's per-level vector namespaces (a
# function name may start with its return type: "void rollingq::AVX2::..."; a name that mentions
# a level's namespace in its arguments is as unique to that level, so it counts too)
ISA_NAMESPACE = re.compile(r"(^|[\s(<,])(rollingq|at::vec)::AVX(2|512)::")
AVX512_NAMESPACE = re.compile(r"(^|[\s(<,])(rollingq|at::vec)::AVX512::")
_PREFIXES = {"lock", "rep", "repz", "repnz", "repe", "repne", "notrack", "bnd", "data16", "addr32"}
# AVX-512 state: zmm, the mask registers, and xmm/ymm 16-31 (EVEX only)
_AVX512_OPERAND = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
_AVX_OPERAND = re.compile(r"%ymm\d|" + _AVX512_OPERAND.pattern)


def _isa_violations(dump: str) -> dict[str, set[str]]:
    """Functions of an ``objdump -d -C --no-show-raw-insn`` listing that use instructions their
    namespace may not: outside the ISA namespaces any VEX/EVEX instruction (mnemonic v...), any
    mask instruction (k...), ymm/zmm, %k0-7 or xmm/ymm 16-31; in the AVX2 namespaces any AVX-512
    state (zmm, %k, xmm/ymm 16-31, k... instructions). Maps function -> offending mnemonics."""
    offenders: dict[str, set[str]] = {}
    function = None
    for line in dump.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not re.fullmatch(r"\s*[0-9a-f]+:", fields[0]):
            continue
        words = fields[1].split()
        while words and words[0] in _PREFIXES:
            words = words[1:]
        if not words:
            continue
        mnemonic, operands = words[0], " ".join(words[1:]).split("<")[0]  # not the <symbol> comment
        if not ISA_NAMESPACE.search(function):
            bad = mnemonic.startswith(("v", "k")) or _AVX_OPERAND.search(operands)
        elif not AVX512_NAMESPACE.search(function):  # AVX2
            bad = mnemonic.startswith("k") or _AVX512_OPERAND.search(operands)
        else:
            bad = False
        if bad:
            offenders.setdefault(function, set()).add(mnemonic)
    return offenders


def test_isa_check_flags_avx_outside_and_avx512_inside_avx2_code():
    # the checker itself: each rule must fire on a line that breaks it, and only there
    def dump(function, insn):
        return f"0000000000001000 <{function}>:\n    1000:\t{insn}\n"

    base, avx2, avx512 = "rollingq::base::mix32(unsigned int)", "rollingq::AVX2::dot(float const*)", \
        "void at::vec::AVX512::foo()"
    for insn, mnemonic in (("vmovss (%rdi),%xmm0", "vmovss"), ("vfmadd231ps %xmm1,%xmm2,%xmm3", "vfmadd231ps"),
                           ("kmovw %eax,%k1", "kmovw"), ("movaps %xmm17,%xmm0", "movaps"),
                           ("addps %ymm0,%ymm1", "addps"), ("notrack vzeroupper", "vzeroupper")):
        assert _isa_violations(dump(base, insn)) == {base: {mnemonic}}, insn
    for insn in ("vaddps %zmm0,%zmm1,%zmm2", "kmovw %k1,%eax", "vmovups %ymm16,(%rdi)",
                 "vmovups %xmm0,%xmm31{%k1}"):
        assert avx2 in _isa_violations(dump(avx2, insn)), insn
    for function, insn in ((base, "movaps %xmm15,%xmm0"), (base, "call 10 <void rollingq::AVX2::x()>"),
                           (avx2, "vfmadd231ps %ymm1,%ymm2,%ymm15"), (avx512, "vaddps %zmm0,%zmm31,%zmm2{%k1}")):
        assert _isa_violations(dump(function, insn)) == {}, insn


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_only_the_isa_units_contain_avx_code():
    # A default build runs on any x86-64 CPU: AVX2 and AVX-512 instructions appear only in the
    # per-level units (csrc/cpu/, namespaces rollingq::AVX2 / rollingq::AVX512), never in code the
    # baseline calls (e.g. an inline function of a shared header kept from an AVX unit), and the
    # AVX2 level never touches AVX-512 state. Only our library is disassembled (libtorch is linked
    # dynamically, not into it).
    if _C.MARCH_NATIVE:
        pytest.skip("built with ROLLINGQ_NATIVE=1 (-march=native): every unit may use the CPU's instructions")
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(Path(_C.__file__))],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"\tvfmadd\w+ .*%zmm", dump) and re.search(r"\tvfmadd\w+ .*%ymm", dump), \
        "the AVX2 and AVX512 units must be in the library (FMA on ymm and zmm)"
    offenders = _isa_violations(dump)
    assert not offenders, f"instructions outside their level: {sorted(offenders.items())[:10]}"
