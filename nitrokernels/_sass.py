"""Read sm_90a machine code (SASS) without a GPU: find each kernel's tensor-core hot loop and count what it issues.

    from nitrokernels import _sass
    text = _sass.disassemble(cubin_bytes)                 # nvdisasm (CUDA toolkit or Triton's bundled copy)
    for kernel, instrs in _sass.parse(text).items():
        for loop in _sass.hot_loops(instrs):              # innermost backward branch whose body holds HGMMA
            print(kernel, loop.summary(), _sass.problems(loop, warps=8))

One home for the SASS facts used by the sm_90a checks in CI (tests/sm90_compile.py, tests/test_build.py) and by
the static cost model (benchmarks/cost_model.py). Pure Python on the disassembler's text: both nvdisasm's form
(`.L_x_3:` labels, ``BRA `(.L_x_3)``) and cuobjdump -sass's form (`BRA 0x2600`) are read.

What a hot loop reports (per iteration, per warp, i.e. per executed instruction of one warp):
  hgmma / mma_flops        HGMMA instructions and their FLOPs per warpgroup (2*M*N*K from HGMMA.MxNxK)
  global loads by kind     LDG.E.U16 (scalar 2-byte), LDG.E (4-byte), LDG.E.64, LDG.E.128, LDGSTS.E.BYPASS.128
                           (16-byte async copy to shared memory), LDGSTS.E.* (narrower async copies), UTMALDG (TMA)
  shared stores / loads    STS.* / LDS.*, LDSM.*
  depbar_levels            the WARPGROUP.DEPBAR.LE gsb0, N levels: N = 0 waits for every MMA group (no overlap)
  local memory             LDL / STL (register spills inside the loop)
  mufu, integer, float     special-function, integer-pipe and FP32-pipe instructions; `other` = the rest
Throughputs used to turn counts into cycles are named constants below (Hopper SM, per sub-partition).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

__all__ = ["Instruction", "Loop", "disassemble", "parse", "loops", "hot_loops", "loop_stats", "problems",
           "find_tool"]

# ------------------------------------------------------------------------------ Hopper issue model (per SM)
SUBPARTITIONS = 4                 # warp schedulers per SM; each issues one warp instruction per cycle
TENSOR_FLOPS_PER_CYCLE = 4096     # dense 16-bit MMA FLOPs per SM per cycle (989 TFLOP/s / 132 SMs / 1.83 GHz)
HMMA_FLOPS_PER_CYCLE = 2048       # the same through mma.sync (HMMA, Ampere-style): about half on Hopper (assumed)
MUFU_CYCLES_PER_WARP_INSTR = 8    # 16 SFU lanes per SM = 4 per sub-partition: 32 lanes / 4
INT_CYCLES_PER_WARP_INSTR = 2     # 16 lanes per sub-partition on each of the two integer-capable pipes: the ALU
                                  # (IADD3, LOP3, SHF, ISETP, ...) and the FMA-heavy pipe (IMAD, IMUL); they
                                  # run in parallel, so a loop's integer cycles are the larger of the two
FP32_CYCLES_PER_WARP_INSTR = 1    # 128 FP32 lanes per SM = 32 per sub-partition
# "well under the MMA time": MUFU + integer pipe cycles of an iteration at most this fraction of its MMA cycles
ISSUE_BUDGET = 0.5

MMA_OPS = ("HGMMA", "HMMA")      # warpgroup MMA (sm_90a) and warp-level mma.sync (small tiles fall back to it)
IMAD_OPS = {"IMAD", "IMADSP", "IMUL", "IMAD32I", "IMUL32I", "IDP", "IDP4A"}
INT_OPS = {"IADD3", "IMAD", "IMADSP", "IMUL", "LEA", "LEA.HI", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX",
           "IABS", "SEL", "SGXT", "BMSK", "BREV", "FLO", "POPC", "PRMT", "IDP", "IDP4A", "ICMP", "VIADD", "VIMNMX",
           "IADD", "IADD32I", "IMAD32I", "ISCADD", "IMUL32I", "LOP32I", "VIADDMNMX", "I2IP"}
FP32_OPS = {"FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "FMUL32I", "FADD32I", "FFMA32I",
            "HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"}
CONVERT_OPS = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "FRND"}        # conversions: reported, not in the budget
UNIFORM_PREFIX = "U"              # uniform-datapath instructions (UIADD3, ULDC, ...) issue beside the vector ones


@dataclass
class Instruction:
    addr: int
    opcode: str                   # full opcode with modifiers, e.g. "LDG.E.U16", "HGMMA.64x128x16.F32.BF16"
    operands: str
    predicate: str = ""
    target: int | None = None     # branch target address (BRA / BRX with a resolved label or address)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_INSTR = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):\s*$")
_NVD_FUNC = re.compile(r"^\s*\.text\.([A-Za-z0-9_$.]+):\s*$")
_CUOBJ_FUNC = re.compile(r"^\s*Function\s*:\s*([A-Za-z0-9_$.]+)\s*$")
_BRANCH_LABEL = re.compile(r"`\((\.L_[A-Za-z0-9_]+)\)")
_BRANCH_ADDR = re.compile(r"^\s*(0x[0-9a-fA-F]+)")
_BRANCHES = {"BRA", "BRX", "JMP", "JMX"}


def find_tool(name: str) -> str | None:
    """nvdisasm / cuobjdump: on PATH, under CUDA_HOME, or the copy bundled in Triton's NVIDIA backend."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (nvdisasm -c: labelled branch targets; falls back to cuobjdump -sass)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        for tool, args in (("nvdisasm", ["-c"]), ("cuobjdump", ["-sass"])):
            exe = find_tool(tool)
            if exe is None:
                continue
            res = subprocess.run([exe, *args, path], capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout
        raise RuntimeError("no working nvdisasm / cuobjdump found (CUDA toolkit, or Triton's backends/nvidia/bin)")


def parse(text: str) -> dict[str, list[Instruction]]:
    """Instructions per kernel, in address order, with branch targets resolved to addresses."""
    kernels: dict[str, list[Instruction]] = {}
    labels: dict[str, dict[str, int]] = {}
    pending: dict[str, list[tuple[Instruction, str]]] = {}
    current, waiting = None, []
    for line in text.splitlines():
        m = _NVD_FUNC.match(line) or _CUOBJ_FUNC.match(line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, [])
            labels.setdefault(current, {})
            pending.setdefault(current, [])
            waiting = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            waiting.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        ins = Instruction(addr, m.group(3), m.group(4).strip(), (m.group(2) or "").strip())
        for name in waiting:
            labels[current][name] = addr
        waiting = []
        if ins.base in _BRANCHES:
            lm = _BRANCH_LABEL.search(ins.operands)
            if lm:
                pending[current].append((ins, lm.group(1)))
            else:
                am = _BRANCH_ADDR.match(ins.operands)
                if am:
                    ins.target = int(am.group(1), 16)
        kernels[current].append(ins)
    for k, items in pending.items():
        for ins, label in items:
            ins.target = labels[k].get(label)
    return kernels


def loops(instrs: list[Instruction]) -> list[tuple[int, int]]:
    """(start, end) address ranges of the backward branches: start = target, end = the branch itself."""
    return sorted({(i.target, i.addr) for i in instrs if i.base in _BRANCHES and i.target is not None
                   and i.target <= i.addr})


def _body(instrs, start, end):
    return [i for i in instrs if start <= i.addr <= end]


def hot_loops(instrs: list[Instruction], mma_ops=MMA_OPS) -> list["Loop"]:
    """The innermost loops holding MMA instructions: backward branches whose body has an MMA and that contain
    no smaller such loop. One entry per loop, in address order."""
    mma_loops = [(s, e) for s, e in loops(instrs) if any(i.base in mma_ops for i in _body(instrs, s, e))]
    inner = [(s, e) for s, e in mma_loops
             if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in mma_loops)]
    return [loop_stats(_body(instrs, s, e), s, e) for s, e in inner]


_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"HMMA\.(16)(8)(8|16)\b")
_DEPBAR = re.compile(r"gsb0\s*,\s*(0x[0-9a-fA-F]+|\d+)")


@dataclass
class Loop:
    start: int
    end: int
    instructions: int = 0
    hgmma: int = 0
    mma_flops: float = 0.0              # HGMMA FLOPs per warpgroup per iteration
    hmma: int = 0
    hmma_flops: float = 0.0             # HMMA (mma.sync) FLOPs per warp per iteration
    global_loads: dict = field(default_factory=dict)    # kind -> count
    shared_stores: dict = field(default_factory=dict)
    shared_loads: int = 0
    depbar_levels: list = field(default_factory=list)
    local_loads: int = 0
    local_stores: int = 0
    mufu: int = 0
    convert: int = 0
    integer: int = 0
    integer_fma: int = 0                # of which on the FMA-heavy pipe (IMAD, IMUL)
    fp32: int = 0
    uniform: int = 0
    barriers: int = 0
    other: int = 0

    # ---------------------------------------------------------------------- derived
    @property
    def min_depbar(self) -> int | None:
        return min(self.depbar_levels) if self.depbar_levels else None

    @property
    def scalar_global_loads(self) -> int:
        """Synchronous global loads narrower than 16 bytes (LDG.E.U8/U16/32/64): staged through registers."""
        return sum(n for kind, n in self.global_loads.items() if kind.startswith("LDG.") and not kind.endswith(".128"))

    @property
    def sync_global_loads(self) -> int:
        return sum(n for kind, n in self.global_loads.items() if kind.startswith("LDG."))

    @property
    def async_global_loads(self) -> int:
        return sum(n for kind, n in self.global_loads.items() if kind.startswith(("LDGSTS", "UTMALDG")))

    def cycles(self, warps: int) -> dict:
        """Per iteration of one CTA with `warps` warps (all warpgroups run the loop): the SM cycles of its MMA
        work and, per sub-partition, of its issue slots, MUFU pipe and integer pipe."""
        per_sub = max(warps, SUBPARTITIONS) / SUBPARTITIONS        # warps sharing one scheduler
        warpgroups = max(warps // 4, 1)
        return {
            "mma": warpgroups * self.mma_flops / TENSOR_FLOPS_PER_CYCLE + warps * self.hmma_flops / HMMA_FLOPS_PER_CYCLE,
            "issue": per_sub * (self.instructions - self.hgmma - self.hmma),
            "mufu": per_sub * self.mufu * MUFU_CYCLES_PER_WARP_INSTR,
            "convert": per_sub * self.convert * MUFU_CYCLES_PER_WARP_INSTR,
            "integer": per_sub * max(self.integer - self.integer_fma, self.integer_fma) * INT_CYCLES_PER_WARP_INSTR,
            "fp32": per_sub * self.fp32 * FP32_CYCLES_PER_WARP_INSTR,
        }

    def summary(self) -> dict:
        d = asdict(self)
        d.update(min_depbar=self.min_depbar, scalar_global_loads=self.scalar_global_loads,
                 async_global_loads=self.async_global_loads)
        return d


def loop_stats(body: list[Instruction], start: int = 0, end: int = 0) -> Loop:
    loop = Loop(start, end, instructions=len(body))
    for ins in body:
        op, base = ins.opcode, ins.base
        if base == "HGMMA":
            loop.hgmma += 1
            m = _SHAPE.search(op)
            if m:
                loop.mma_flops += 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        elif base == "HMMA":
            loop.hmma += 1
            m = _HMMA_SHAPE.search(op)
            if m:   # HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8
                loop.hmma_flops += 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        elif base in ("LDG", "LDGSTS", "UTMALDG", "UBLKCP"):
            kind = op if base != "LDG" else _ldg_kind(op)
            loop.global_loads[kind] = loop.global_loads.get(kind, 0) + 1
        elif base == "STS":
            loop.shared_stores[op] = loop.shared_stores.get(op, 0) + 1
        elif base in ("LDS", "LDSM"):
            loop.shared_loads += 1
        elif base == "WARPGROUP" and "DEPBAR" in op:
            m = _DEPBAR.search(ins.operands)
            if m:
                loop.depbar_levels.append(int(m.group(1), 0))
        elif base == "LDL":
            loop.local_loads += 1
        elif base == "STL":
            loop.local_stores += 1
        elif base == "MUFU":
            loop.mufu += 1
        elif base in CONVERT_OPS:
            loop.convert += 1
        elif base in INT_OPS:
            loop.integer += 1
            loop.integer_fma += base in IMAD_OPS
        elif base in FP32_OPS:
            loop.fp32 += 1
        elif base in ("BAR", "SYNCS", "MEMBAR", "DEPBAR", "WARPSYNC", "LDGDEPBAR", "ARRIVES"):
            loop.barriers += 1
        elif base.startswith(UNIFORM_PREFIX) and base not in ("UTMALDG",):
            loop.uniform += 1
        else:
            loop.other += 1
    return loop


def _ldg_kind(op: str) -> str:
    """LDG opcodes by access width: LDG.E.U16 / LDG.E.U8 / LDG.E (32-bit) / LDG.E.64 / LDG.E.128 (cache hints
    such as .EL/.LTC128B/.CONSTANT dropped)."""
    parts = op.split(".")
    width = next((p for p in parts[1:] if p in ("U8", "S8", "U16", "S16", "64", "128")), None)
    return "LDG.E" + (f".{width}" if width else "")


def problems(loop: Loop, warps: int) -> list[str]:
    """What the CI check refuses in a tensor-core hot loop (empty list = passes):
    scalar global loads staged through registers into shared memory, every MMA group awaited each iteration,
    local memory, MUFU + integer pipe cycles not well under the MMA cycles."""
    out = []
    if loop.scalar_global_loads and loop.shared_stores:
        kinds = {k: n for k, n in loop.global_loads.items() if k.startswith("LDG.") and not k.endswith(".128")}
        out.append(f"scalar global loads staged through registers into shared memory: {kinds} + "
                   f"{loop.shared_stores} per iteration")
    if loop.min_depbar == 0:
        out.append("waits for every MMA group each iteration (WARPGROUP.DEPBAR.LE gsb0, 0x0): no MMA in flight")
    if loop.local_loads or loop.local_stores:
        out.append(f"local memory in the loop: {loop.local_loads} LDL, {loop.local_stores} STL")
    c = loop.cycles(warps)
    if c["mufu"] + c["integer"] > ISSUE_BUDGET * c["mma"]:
        out.append(f"MUFU + integer pipe cycles {c['mufu'] + c['integer']:.0f} > {ISSUE_BUDGET} x MMA cycles "
                   f"{c['mma']:.0f} per iteration ({loop.mufu} MUFU, {loop.integer} integer instructions per warp)")
    return out
