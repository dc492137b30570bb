"""Every Triton kernel compiles for a Hopper GPU (sm_90), on a machine without one.

The interpreter tests (test_triton_scan.py) check what the kernels compute, but the interpreter accepts code the
GPU compiler rejects (e.g. loop bounds or scalar types it cannot lower). This compiles each kernel, in each
specialisation the library launches, down to a cubin with Triton's own ``ptxas``: no GPU needed. It runs in a
subprocess because the test process runs Triton in interpreter mode (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

COMPILE_ALL = r'''
import json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print(json.dumps({"skip": "this Triton has no compile-only API"})); sys.exit(0)
from mambatrim.ops import policy, triton_head, triton_norm, triton_rows, triton_scan, triton_vim
from mambatrim.reduce import rmeeto_kernels

LOW = {"oh_ptr", "out2_ptr", "u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "x_ptr", "h_ptr", "y_ptr", "dout_ptr", "du_ptr",
       "dz_ptr", "g_ptr", "dx_ptr", "ga_ptr", "xz_ptr"}  # activations in bf16 (the model's dtype), the rest fp32

def build(kernel, constants, low=LOW):
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in ("on_ptr", "out_seq_ptr", "q_ptr", "src_ptr", "slot_ptr", "seq_ptr",
                      "inv_ptr", "partner_ptr", "kept_ptr", "kslot_ptr"):
            sig[name] = "*i32"
        elif name in ("pos_ptr", "out_pos_ptr", "cls_ptr", "idx_ptr", "order_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in low else "*fp32"
        else:
            sig[name] = "fp32" if name in ("scale", "eps") else "i32"
    triton.compile(ASTSource(kernel, sig, constants), target=GPUTarget("cuda", 90, 32))

scan = dict(N=16, NP=16, BD=64, SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, CHUNK_T=policy.get("scan_ckpt_chunk"),
            BC8=True, T=0, STAGES=1, SPLIT_G=False, GATE_LAST=False, PF=0)
bwd = dict(N=16, NP=16, BD=32, SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, T=policy.get("scan_ckpt_chunk"),
           REVERSE=False, BC8=True)
conv = dict(K=4, BL=policy.get("conv_block_l"), BE=policy.get("conv_block_e"), HAS_BIAS=True)
cases = {
    "scan fwd, pair, per-sample direction switch": (triton_scan._scan_fwd_kernel, dict(
        scan, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=True, STATE_ONLY=False, CARRY_IN=False)),
    "scan fwd split, chunk states, pair with gaps": (triton_scan._scan_fwd_kernel, dict(
        scan, G=2, PAIR=True, REVERSE=False, HAS_GAP=True, STORE_CKPT=False, HAS_ON=True, STATE_ONLY=True,
        CARRY_IN=False)),
    "scan fwd split, outputs from carried states, training": (triton_scan._scan_fwd_kernel, dict(
        scan, GATE_LAST=True, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=True, HAS_ON=False, STATE_ONLY=False,
        CARRY_IN=True)),
    "tiled scan fwd, pair, inference, per-sample switch, the gate on the sum": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=True,
        STATE_ONLY=False, CARRY_IN=False, STAGES=3, GATE_LAST=True)),
    "tiled scan fwd, pair, inference, the gate on the sum (as Vim launches it)": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=False,
        STATE_ONLY=False, CARRY_IN=False, STAGES=3, GATE_LAST=True), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd, pair, directions as separate programs, per-sample switch": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=True,
        STATE_ONLY=False, CARRY_IN=True, STAGES=3, SPLIT_G=True), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd split, chunk states, directions as separate programs": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=False,
        STATE_ONLY=True, CARRY_IN=False, STAGES=3, SPLIT_G=True), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd, pair, directions as separate programs, rows prefetched": (triton_scan._scan_fwd_kernel,
        dict(scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=False,
             STATE_ONLY=False, CARRY_IN=False, STAGES=3, SPLIT_G=True, PF=32), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd split, pair, one program, the gate on the sum, rows prefetched": (triton_scan._scan_fwd_kernel,
        dict(scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=False, HAS_ON=True,
             STATE_ONLY=False, CARRY_IN=True, STAGES=3, GATE_LAST=True, PF=32), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd, pair, training, fp32 B and C (as launched)": (triton_scan._scan_fwd_kernel, dict(
        scan, GATE_LAST=True, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=True, HAS_ON=False,
        STATE_ONLY=False, CARRY_IN=True, STAGES=3), LOW - {"B_ptr", "C_ptr"}),
    "tiled scan fwd split, chunk states, pair with gaps": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=32, T=4, G=2, PAIR=True, REVERSE=False, HAS_GAP=True, STORE_CKPT=False, HAS_ON=False,
        STATE_ONLY=True, CARRY_IN=False, STAGES=1)),
    "tiled scan fwd split, outputs from carried states, one direction, training": (triton_scan._scan_fwd_kernel, dict(
        scan, BD=64, T=2, G=1, PAIR=False, REVERSE=True, HAS_GAP=True, STORE_CKPT=True, HAS_ON=False,
        STATE_ONLY=False, CARRY_IN=True, STAGES=1)),
    "scan bwd split, segment carries, pair": (triton_scan._scan_bwd_carry_kernel, dict(
        {k: bwd[k] for k in ("N", "NP", "BD", "SOFTPLUS", "HAS_Z", "HAS_BIAS", "REVERSE")}, PAIR=True,
        HAS_GAP=False, BC8=True)),
    "scan bwd split, segment carries, one direction with gaps": (triton_scan._scan_bwd_carry_kernel, dict(
        {k: bwd[k] for k in ("N", "NP", "BD", "SOFTPLUS", "HAS_Z", "HAS_BIAS")}, REVERSE=True, PAIR=False,
        HAS_GAP=True, BC8=False)),
    "scan bwd split, pair": (triton_scan._scan_bwd_seq_kernel, dict(bwd, PAIR=True, HAS_GAP=False, CARRY_IN=True)),
    "scan fwd, pair, training": (triton_scan._scan_fwd_kernel, dict(
        scan, G=2, PAIR=True, REVERSE=False, HAS_GAP=False, STORE_CKPT=True, HAS_ON=False, STATE_ONLY=False, CARRY_IN=False)),
    "scan fwd, one direction with gaps": (triton_scan._scan_fwd_kernel, dict(
        scan, G=1, PAIR=False, REVERSE=True, HAS_GAP=True, STORE_CKPT=True, HAS_ON=False, STATE_ONLY=False, CARRY_IN=False, BC8=False)),
    "scan fwd, pair with gaps (aligned pruning, inference)": (triton_scan._scan_fwd_kernel, dict(
        scan, G=2, PAIR=True, REVERSE=False, HAS_GAP=True, STORE_CKPT=False, HAS_ON=False, STATE_ONLY=False,
        CARRY_IN=False)),
    "scan bwd, pair": (triton_scan._scan_bwd_seq_kernel, dict(bwd, PAIR=True, HAS_GAP=False, CARRY_IN=False)),
    "tiled scan bwd, pair": (triton_scan._scan_bwd_tile_kernel, dict(
        {k: v for k, v in bwd.items() if k not in ("T", "HAS_GAP")}, CHUNK_T=8, T=2, PAIR=True, CARRY_IN=False)),
    "tiled scan bwd split, one direction, 4-step tiles": (triton_scan._scan_bwd_tile_kernel, dict(
        {k: v for k, v in bwd.items() if k not in ("T", "HAS_GAP")}, BD=16, CHUNK_T=8, T=4, PAIR=False,
        REVERSE=True, CARRY_IN=True)),
    "scan bwd, one direction with gaps": (triton_scan._scan_bwd_seq_kernel, dict(bwd, PAIR=False, HAS_GAP=True, CARRY_IN=False)),
    "conv pair": (triton_vim._conv_pair_kernel, dict(conv, HAS_ON=False, HAS_MAP=False)),
    "conv pair, per-sample direction switch": (triton_vim._conv_pair_kernel, dict(conv, HAS_ON=True, HAS_MAP=False)),
    "conv pair, position map (aligned pruning)": (triton_vim._conv_pair_kernel, dict(
        conv, HAS_ON=False, HAS_MAP=True)),
    "conv pair backward": (triton_vim._conv_pair_bwd_kernel, dict(BE=policy.get("conv_bwd_block_e"), HAS_BIAS=True)),
    "R-MeeTo merge plan": (rmeeto_kernels._merge_plan_kernel, dict(
        RULE=0, NP=128, BK=rmeeto_kernels.CHUNK_D, PREC="tf32")),
    "R-MeeTo tiled plan: best partners": (rmeeto_kernels._best_partner_kernel, dict(
        TA=policy.get("merge_tile"), TB=policy.get("merge_tile"), BK=rmeeto_kernels.CHUNK_D, PREC="tf32")),
    "R-MeeTo tiled plan: slots, official rule": (rmeeto_kernels._merge_slots_kernel, dict(
        RULE=0, BLOCK=policy.get("merge_slot_block"))),
    "R-MeeTo tiled plan: slots, boundary rule": (rmeeto_kernels._merge_slots_kernel, dict(
        RULE=2, BLOCK=policy.get("merge_slot_block"))),
    "R-MeeTo merge rows, long sequence": (rmeeto_kernels._merge_rows_kernel, dict(
        HAS_RES=True, BD=512, RP=rmeeto_kernels.ROWS_SLOT_BLOCK)),
    "R-MeeTo merge rows": (rmeeto_kernels._merge_rows_kernel, dict(HAS_RES=True, BD=512, RP=32)),
    "R-MeeTo merge rows, no residual": (rmeeto_kernels._merge_rows_kernel, dict(HAS_RES=False, BD=512, RP=16)),
    "add + rms norm": (triton_norm._add_rms_norm_kernel, dict(HAS_RES=True, BLOCK=512)),
    "rms norm backward": (triton_norm._rms_norm_bwd_kernel, dict(HAS_DRES=True, HAS_DR=False, BM=8, BLOCK=512)),
    "add + layer norm (DyVM predictor)": (triton_norm._add_layer_norm_kernel, dict(BLOCK=512)),
    "class-token direction gate": (triton_vim._class_token_gate_kernel, dict(HAS_BIAS=True, BK=1024)),
    "row gather": (triton_rows._take_rows_kernel, dict(BK=triton_rows.ROWS_PER_PROGRAM, BD=triton_rows.BLOCK_D)),
    "DyVM keep head, Vim-S widths": (triton_head._keep_head_kernel, dict(
        BM=triton_head.BLOCK_M, BK=triton_head.BLOCK_K, H1P=256, BC=triton_head.BLOCK_C, PRECISION="tf32")),
    "DyVM keep head, Vim-B widths, fp32": (triton_head._keep_head_kernel, dict(
        BM=triton_head.BLOCK_M // 2, BK=triton_head.BLOCK_K, H1P=512, BC=triton_head.BLOCK_C, PRECISION="ieee")),
}
results = {}
for name, (kernel, constants, *low) in cases.items():
    try:
        build(kernel, constants, *low)
        results[name] = "ok"
    except Exception as err:  # noqa: BLE001 (reported by the test)
        results[name] = f"{type(err).__name__}: {str(err)[-2000:]}"
if all("ptxas" in r or "backend" in r.lower() for r in results.values() if r != "ok") and \
        any(r != "ok" for r in results.values()) and not any(r == "ok" for r in results.values()):
    print(json.dumps({"skip": "cannot compile for sm_90 here: " + next(iter(results.values()))})); sys.exit(0)
print(json.dumps(results))
'''


def test_every_kernel_compiles_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    failed = {name: r for name, r in results.items() if r != "ok"}
    assert not failed, "\n\n".join(f"{name}: {r}" for name, r in failed.items())
    assert len(results) == 40
