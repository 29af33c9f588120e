"""nitrokernels._sass on small handwritten SASS: hot-loop finding, instruction counts, and the CI refusals
(each refusal is shown to fire on the bad pattern the sm_90a hot-loop check exists to catch)."""
import pytest

from nitrokernels import _sass

# A Triton-style pipelined GEMM loop (nvdisasm form): 16-byte async copies, one MMA group left in flight.
GOOD = """
//--------------------- .text.good          --------------------------
.text.good:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   IMAD R2, R0, 0x10, RZ ;
.L_x_1:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R15], desc[UR24][R4.64], P1 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R15+0x1000], desc[UR24][R6.64], P1 ;
        /*0040*/                   LDGDEPBAR ;
        /*0050*/                   WARPGROUP.ARRIVE ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR12], R88 ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR16], R88, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   IADD3 R4, P0, R4, 0x80, RZ ;
        /*00a0*/                   ISETP.GE.AND P6, PT, R2, 0x10, PT ;
        /*00b0*/               @P6 BRA `(.L_x_1) ;
        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00d0*/                   EXIT ;
"""

# The pattern of the issue: scalar 2-byte loads staged through registers, every MMA group awaited, a spill,
# and GroupNorm+SiLU recomputed per A-tile (MUFU); an outer loop around the hot one.
BAD = """
//--------------------- .text.bad          --------------------------
.text.bad:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   IMAD R2, R0, 0x10, RZ ;
.L_x_2:
        /*0020*/                   LDG.E.U16 R10, desc[UR24][R4.64] ;
        /*0030*/                   LDG.E.U16.CONSTANT R11, desc[UR24][R4.64+0x2800] ;
        /*0040*/                   STS.U16 [R3], R10 ;
        /*0050*/                   STS.U16 [R3+0x100], R11 ;
        /*0060*/                   MUFU.EX2 R12, R12 ;
        /*0070*/                   MUFU.RCP R12, R12 ;
        /*0078*/                   MUFU.RSQ R13, R12 ;
        /*0080*/                   STL [R1], R12 ;
        /*0090*/                   WARPGROUP.ARRIVE ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*00b0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00c0*/                   LDL R12, [R1] ;
        /*00d0*/               @P0 BRA `(.L_x_2) ;
        /*00e0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00f0*/               @P1 BRA `(.L_x_0) ;
        /*0100*/                   EXIT ;
"""

# cuobjdump -sass form of a loop (numeric branch targets), and a loop without MMA that must be ignored.
CUOBJ = """
        Function : cuobj
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;               /* 0x0000000404027981 */
        /*0020*/                   FADD R2, R2, 1 ;                             /* 0x3f80000002027421 */
        /*0030*/              @P0 BRA 0x10 ;                                  /* 0x0000000000008947 */
        /*0040*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0050*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0070*/              @P1 BRA 0x40 ;
        /*0080*/                   EXIT ;
"""


def _one_loop(text, kernel):
    loops = _sass.hot_loops(_sass.parse(text)[kernel])
    assert len(loops) == 1, loops
    return loops[0]


def test_good_loop_counts_and_passes():
    loop = _one_loop(GOOD, "good")
    assert (loop.start, loop.end) == (0x20, 0xb0)
    assert loop.hgmma == 2 and loop.mma_flops == 2 * (2 * 64 * 128 * 16)
    assert loop.global_loads == {"LDGSTS.E.BYPASS.128": 2} and loop.async_global_loads == 2
    assert loop.depbar_levels == [1] and loop.min_depbar == 1   # the 0x0 after the loop is not in it
    assert loop.integer == 2 and loop.mufu == 0 and not loop.shared_stores
    assert _sass.problems(loop, warps=8) == []


def test_bad_loop_is_refused_for_each_reason():
    loop = _one_loop(BAD, "bad")
    assert (loop.start, loop.end) == (0x20, 0xd0)          # the inner loop, not the outer one
    assert loop.global_loads == {"LDG.E.U16": 2} and loop.scalar_global_loads == 2
    assert loop.shared_stores == {"STS.U16": 2}
    assert loop.local_loads == 1 and loop.local_stores == 1 and loop.mufu == 3 and loop.min_depbar == 0
    found = " | ".join(_sass.problems(loop, warps=4))
    for what in ("scalar global loads staged", "no MMA in flight", "local memory", "MUFU + integer"):
        assert what in found, found


def test_mufu_budget_scales_with_the_mma_work():
    # 3 MUFU per warp = 24 cycles of a sub-partition's SFU; one 64x64x16 HGMMA per warpgroup = 32 SM cycles:
    # over the 0.5 budget with 4 warps; a 64x256 tile (128 cycles) is well inside it.
    bad = _one_loop(BAD, "bad")
    assert bad.cycles(4)["mma"] == 32 and bad.cycles(4)["mufu"] == 24
    big = _one_loop(BAD.replace("64x64x16", "64x256x16"), "bad")
    assert not any("MUFU" in p for p in _sass.problems(big, warps=4))


def test_cuobjdump_form_and_loops_without_mma():
    kernels = _sass.parse(CUOBJ)
    assert _sass.loops(kernels["cuobj"]) == [(0x10, 0x30), (0x40, 0x70)]
    loop = _one_loop(CUOBJ, "cuobj")                        # the LDG loop holds no HGMMA
    assert (loop.start, loop.end) == (0x40, 0x70)
    assert loop.global_loads == {"UTMALDG.2D": 1} and loop.mma_flops == 2 * 64 * 256 * 16
    assert _sass.problems(loop, warps=4) == []


def test_ldg_kinds():
    assert _sass._ldg_kind("LDG.E.U16.CONSTANT") == "LDG.E.U16"
    assert _sass._ldg_kind("LDG.E.128.CONSTANT") == "LDG.E.128"
    assert _sass._ldg_kind("LDG.E.EL") == "LDG.E"
    wide = _one_loop(GOOD.replace("LDGSTS.E.BYPASS.128 [R15], desc[UR24][R4.64], P1",
                                  "LDG.E.128 R8, desc[UR24][R4.64]"), "good")
    assert wide.scalar_global_loads == 0 and wide.sync_global_loads == 1


def test_disassembles_a_real_cubin_when_the_tools_are_there():
    if _sass.find_tool("nvdisasm") is None and _sass.find_tool("cuobjdump") is None:
        pytest.skip("no nvdisasm / cuobjdump")
    with pytest.raises(RuntimeError):
        _sass.disassemble(b"not a cubin")


def test_mma_sync_loops_count_at_their_rate():
    """Small tiles fall back to mma.sync (HMMA, per warp, m16n8k16): found as hot loops, priced at half rate."""
    loop = _one_loop(GOOD.replace("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR12], R88", "HMMA.16816.F32.BF16 R8, R4, R2, R8")
                     .replace("HGMMA.64x128x16.F32.BF16 R88, gdesc[UR16], R88, gsb0", "HMMA.16816.F32.BF16 R12, R4, R6, R12"),
                     "good")
    assert loop.hgmma == 0 and loop.hmma == 2 and loop.hmma_flops == 2 * (2 * 16 * 8 * 16)
    assert loop.cycles(4)["mma"] == 4 * loop.hmma_flops / _sass.HMMA_FLOPS_PER_CYCLE


def test_integer_pipes_run_in_parallel():
    """IMAD/IMUL issue to the FMA-heavy pipe, IADD3/LOP3/... to the ALU: integer cycles = the busier one."""
    extra = "".join(f"        /*009{i}*/                   IMAD R{20 + i}, R2, 0x3, RZ ;\n" for i in range(3))
    loop = _one_loop(GOOD.replace("        /*00a0*/", extra + "        /*00a0*/"), "good")
    assert loop.integer == 5 and loop.integer_fma == 3
    assert loop.cycles(4)["integer"] == 3 * _sass.INT_CYCLES_PER_WARP_INSTR
