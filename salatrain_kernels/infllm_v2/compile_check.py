"""Compile every InfLLM-V2 kernel for sm_90 (H100/H200) without a GPU; print registers, spills, shared memory.

A development check for CPU machines: the interpreter runs the kernels' logic but not the GPU compiler, which is
where tile shapes, layouts, register pressure and shared-memory limits fail. Uses Triton's bundled ptxas and the
production launch settings (bf16, G = 16, D = 128, block 64; the fp32 test tiles; small groups; selection), each
local-window and selection kernel also in its variants for the released rules ("block": local_blocks=block,
"perrow": the sequence rule with documents on both sides of dense_len).
Pointer and stride arguments are marked divisible by 16, as the JIT specializes them at launch.

    TRITON_INTERPRET=0 python -m salatrain_kernels.infllm_v2.compile_check [name-filter ...]

Relies on Triton internals (ASTSource, attrs format) of Triton >= 3.3; a development tool, not a test.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gather as GA
from . import plan as PL
from . import score as S
from . import selection as SEL
from . import shared as SH
from . import window as W

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas() -> str:
    for name in ("ptxas-blackwell", "ptxas"):  # the newest bundled ptxas accepts the newest PTX
        if os.path.exists(os.path.join(BIN, name)):
            return os.path.join(BIN, name)
    return "ptxas"


def compile_one(name, fn, arg_types, consts, warps, stages) -> bool:
    sig = {a: "constexpr" if a in consts else arg_types[a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and (arg_types[a].startswith("*") or a.startswith("stride_"))}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                                options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # report and go on with the next kernel
        print(f"FAIL {name} w{warps} s{stages}: {str(e).strip().splitlines()[-1:]}")
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs, spill = re.findall(r"Used (\d+) registers", info), re.findall(r"(\d+) bytes spill stores", info)
    print(f"ok   {name:28s} w{warps} s{stages}: regs {regs[-1] if regs else '?':>3} spill {spill[-1] if spill else '?':>5}"
          f" shared {kernel.metadata.shared}")
    return True


def _ptrs(dtype, *names):
    return {n: f"*{dtype}" for n in names}


def _ints(*names):
    return {n: "i32" for n in names}


def jobs():
    """(name, kernel, argument types, constexprs, [(num_warps, num_stages)]) of the launches to check."""
    out = []
    for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        small = prec == "ieee"  # fp32 runs (tests) use small tiles, see AttnPlan / BlockScorer
        tuned = lambda opts: opts if not small else opts[:1]  # noqa: E731
        for gname, g, gp in (("G16", 16, 16), ("G3", 3, 4), ("G1", 1, 1)):
            if small and g != 16:
                continue
            bq = max(1, (64 if small else 128) // gp)
            score_args = {**_ptrs(dt, "q_ptr", "kc_ptr", "kn_ptr"), **_ptrs("fp32", "out_ptr", "tail_ptr"),
                          **_ptrs("i32", "tile_row0_ptr", "tile_nrows_ptr", "tile_doc_ptr", "row_pos_ptr",
                                  "doc_cfirst_ptr", "doc_ccount_ptr", "doc_nfirst_ptr", "doc_ncount_ptr",
                                  "doc_nblocks_ptr"),
                          **_ints("n_tiles", "row_base", "num_blocks_out", "stride_qr", "stride_qh", "stride_cr",
                                  "stride_ch", "stride_nr", "stride_nh", "stride_oh", "stride_or", "stride_ih",
                                  "stride_ir", "k_slots"),
                          **_ptrs("i32", "idx_ptr"), "scale_log2": "fp32"}
            for norm, nks, nst in (("exact", 32, 16), ("coarse", 128, 64)):
                for fused in (False, True):  # fused: SALA's selection (K = 64 + 32 slots) in the scoring kernel
                    consts = dict(G=g, GP=gp, BQ=bq, D=128, BD=128, KS=32, KSTRIDE=16, R=4, C=2, NKS=nks,
                                  NSTRIDE=nst, NBT=8 if small else 16, BCN=32 if small else 64, WRITE_ALL=False,
                                  PREC=prec, FUSED=fused, KP=128 if fused else 1, LP=64 if fused else 1, INIT=1,
                                  WIN=2048, BLOCK_LOCAL=False, SPLIT=True)
                    out.append((f"scores{' +select' if fused else ''} {dt} {gname} {norm}", S._block_scores_kernel,
                                score_args, consts, tuned([(8, 2), (8, 3), (4, 2)])))
            for kind, fn in (("fwd", GA._gather_fwd_kernel), ("dq", GA._gather_dq_kernel)):
                args = {**_ptrs(dt, "q_ptr", "k_ptr", "v_ptr", "do_ptr"), **_ptrs("fp32", "o_ptr", "lse_ptr",
                        "delta_ptr", "dq_ptr"), **_ptrs("i32", "idx_ptr", "count_ptr", "rows_ptr", "row_pos_ptr",
                        "row_kbase_ptr"), **_ints("n_rows", "out_row_base", "stride_qr", "stride_qh", "stride_kr",
                        "stride_kh", "stride_or", "stride_oh", "stride_lr", "stride_ih", "stride_ir", "stride_ch",
                        "stride_dqr", "stride_dqh"), "scale_log2": "fp32", "scale": "fp32"}
                opts = [(4, 3), (4, 2), (8, 3)] if kind == "fwd" else [(4, 2), (4, 3), (8, 2)]
                for tag, kv_args, kv_consts in _kv_loads(dt):
                    consts = dict(G=g, M=max(16, gp), TOK=1, D=128, BD=128, BS=64, NBI=1, PREC=prec, **kv_consts)
                    out.append((f"gather_{kind} {dt} {gname}{tag}", fn, {**args, **kv_args}, consts, tuned(opts)))
            for kind, fn in (("fwd", SH._shared_fwd_kernel), ("dq", SH._shared_dq_kernel)):
                args = {**_ptrs(dt, "q_ptr", "k_ptr", "v_ptr", "do_ptr"), **_ptrs("fp32", "o_ptr", "lse_ptr",
                        "delta_ptr", "dq_ptr"), **_ptrs("i32", "union_ptr", "bits_ptr", "ucount_ptr", "use_ptr",
                        "gb_krow0_ptr", "gb_kend_ptr", "rows_ptr", "row_pos_ptr", "row_kbase_ptr"),
                        **_ints("n_rows", "out_row_base", "stride_qr", "stride_qh", "stride_kr", "stride_kh",
                                "stride_or", "stride_oh", "stride_lr", "stride_uh", "stride_ut", "stride_ch",
                                "stride_dqr", "stride_dqh"), "scale_log2": "fp32", "scale": "fp32"}
                # TQ 2 and 4, and for small groups the packed tile (pack_share: 16 rows) with the plan's rows a query
                shares = sorted({2, 4, SH.pack_share(g)} - {1})
                for (tag, kv_args, kv_consts), tq in ((x, tq) for x in _kv_loads(dt) for tq in shares):
                    consts = dict(G=g, M=max(gp, 16 // tq), TQ=tq, D=128, BD=128, BS=64, PREC=prec, **kv_consts)
                    out.append((f"shared_{kind} {dt} {gname} TQ{tq}{tag}", fn, {**args, **kv_args}, consts,
                                tuned([(4, 2), (8, 2), (4, 3)])))
            args = {**_ptrs(dt, "q_ptr", "k_ptr", "v_ptr", "do_ptr"), **_ptrs("fp32", "lse_ptr", "delta_ptr",
                    "dk_ptr", "dv_ptr", "dq_ptr"), **_ptrs("i32", "chunk_key_ptr", "chunk_e0_ptr", "chunk_e1_ptr",
                    "n_chunks_ptr", "entry_row_ptr", "gb_krow0_ptr", "gb_kend_ptr", "row_pos_ptr", "row_kbase_ptr"),
                    **_ints("num_gblocks", "stride_qr", "stride_qh", "stride_kr", "stride_kh", "stride_lr",
                            "stride_dkr", "stride_dkh", "stride_dqr", "stride_dqh"),
                    "scale_log2": "fp32", "scale": "fp32"}
            consts = dict(G=g, GP=gp, TP=max(1, 32 // gp), D=128, BD=128, BS=64, BK=64, PREC=prec, DQ=False,
                          ATOMIC=True, PREFETCH=True)
            # the production launch: 32 rows a step, each loaded during the step before, 4 warps (the fp32 test
            # tiles: 8), one stage; then the sweep's candidates (bench/infllmv2_sweep.py)
            out.append((f"gather_dkdv {dt} {gname}", GA._gather_dkdv_kernel, args, consts,
                        [(8, 1)] if small else [(4, 1), (8, 1)]))
            if not small:  # the pipeliner's loop (the default before 2026-12-03: 64 rows, 2 stages), its variants
                piped = dict(consts, PREFETCH=False, TP=max(1, 64 // gp))
                out.append((f"gather_dkdv {dt} {gname} pipelined", GA._gather_dkdv_kernel, args, piped,
                            [(4, 2), (4, 3), (8, 2)]))
                out.append((f"gather_dkdv {dt} {gname} plain", GA._gather_dkdv_kernel, args, dict(consts, ATOMIC=False),
                            [(4, 1)]))
                out.append((f"gather_dkdv {dt} {gname} BK32", GA._gather_dkdv_kernel, args, dict(piped, BK=32),
                            [(4, 2), (8, 2)]))
                for tp, bk in ((1, 64), (2, 32)):  # the sweep's prefetched variants
                    out.append((f"gather_dkdv {dt} {gname} prefetch TP{tp} BK{bk}", GA._gather_dkdv_kernel, args,
                                dict(consts, TP=max(1, tp * 16 // gp), BK=bk), [(4, 1)]))
        bm, bn, bmq = (64, 32, 32) if small else (128, 64, 64)
        common = {**_ptrs(dt, "q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr"),
                  **_ptrs("fp32", "lse_ptr", "part_o_ptr", "part_lse_ptr", "delta_ptr", "part_ptr", "dk_ptr",
                          "dv_ptr"),
                  **_ptrs("i32", "tile_row0_ptr", "tile_nrows_ptr", "row_pos_ptr", "row_kbase_ptr", "row_dense_ptr",
                          "ktile_doc_ptr", "ktile_start_ptr", "doc_kstart_ptr", "doc_len_ptr", "doc_qstart_ptr",
                          "doc_qpos0_ptr", "doc_qend_ptr", "doc_dense_ptr"),
                  **_ints("n_tiles", "part_row_base", "dense_len", "stride_qr", "stride_qh", "stride_kr", "stride_kh",
                          "stride_or", "stride_oh", "stride_lr", "stride_pr", "stride_ph", "stride_plr", "stride_dkr",
                          "stride_dkh"), "scale_log2": "fp32", "scale": "fp32"}
        for win, part, block, per_row in _local_variants(small):
            local = dict(G=16, D=128, BD=128, BN=bn, BS=64, WIN=win, PREC=prec, BLOCK_LOCAL=block,
                         PER_ROW_DENSE=per_row)
            tag = f"win{win}" + (" block" if block else "") + (" perrow" if per_row else "")
            out.append((f"local_fwd {dt} {tag}", W._local_fwd_kernel, common, dict(local, BM=bm, HAS_PART=part),
                        [(8, 2)] if small else [(8, 3), (8, 2)]))
            out.append((f"local_dq {dt} {tag}", W._local_dq_kernel, common, dict(local, BM=bmq, HAS_PART=part),
                        [(4, 2)]))
            out.append((f"local_dkdv {dt} {tag}", W._local_dkdv_kernel, common, dict(local, BM=bmq, NSPLIT=4),
                        [(8, 2)]))
        out.append((f"delta {dt}", PL._delta_kernel, {**_ptrs(dt, "o_ptr", "do_ptr"), **_ptrs("fp32", "delta_ptr"),
                    "n": "i32"}, dict(D=128, BD=128, BLOCK=64), [(4, 2)]))
    sel_args = {**_ptrs("fp32", "score_ptr", "tail_ptr"), **_ptrs("i32", "idx_ptr", "row_pos_ptr", "row_dense_ptr"),
                **_ints("row_lo", "row_hi", "score_row_base", "num_blocks", "dense_len", "stride_sh", "stride_sr",
                        "stride_ih", "stride_ir")}
    for name, nbp, br, warps in (("select 128K", 2048, 2, 8), ("select 512K", 8192, 1, 8), ("select 1M", 16384, 1, 16)):
        for block, per_row in ((False, False), (True, True)):
            consts = dict(BS=64, INIT=1, WIN=2048, K=96, KP=128, NBP=nbp, BR=br, SKIP_DENSE=True, HAS_TAIL=True,
                          BLOCK_LOCAL=block, PER_ROW_DENSE=per_row)
            tag = " block perrow" if block else ""
            out.append((name + tag, SEL._select_kernel, sel_args, consts, [(warps, 2)]))
    return out


def _kv_loads(dt):
    """(name tag, argument types, constexprs) of the gathered kernels' K/V loads: tensor descriptors (the default,
    window split: FULL) and pointers (descriptor arguments then unused)."""
    desc = f"tensordesc<{dt}[64, 1, 128]>"
    return [(" tma", {"k_desc": desc, "v_desc": desc}, dict(DESC=True, FULL=True)),
            (" ptr", _ptrs(dt, "k_desc", "v_desc"), dict(DESC=False, FULL=True))]


def _local_variants(small: bool):
    """(WIN, HAS_PART, BLOCK_LOCAL, PER_ROW_DENSE) of the local-window kernels: salatrain's rules with and without
    the window split, and the released rules' variants (all of them for the production tiles)."""
    rules = [(False, False), (True, True)] if small else [(False, False), (True, False), (False, True), (True, True)]
    split = [(2048, True, block, per_row) for block, per_row in rules]
    return split + [(0, False, False, per_row) for per_row in (False, True)]


def main(filters: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET (before importing the kernels): this compiles them, it does not interpret them")
        return 2
    failures = 0
    for name, fn, args, consts, options in jobs():
        if filters and not any(f in name for f in filters):
            continue
        for warps, stages in options:
            failures += not compile_one(name, fn, args, consts, warps, stages)
    print(f"{failures} failure(s)")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
