"""Experiment behind lab 02's GEMV fast path (reference/lab02_numerics/w4a16_gemv.py), kept as the record: variants of
the kernel timed against torch's bf16 matmul on a GPU, in CUDA graphs over weight copies past the L2, interleaved.

Config tuples are (block_n, split_k, num_warps, deq, out, layout):
    deq     0: codes.to(float32) (an int-to-float conversion); 1: bitcast(q | 0x4B000000) - (2^23 + 8);
            2: the same on nibbles masked in place (no shift for nibbles 0..4, x pre-scaled by 16^-i)
    out     0: split-K partial sums added with fp32 atomics, then cast; 1: atomics straight into x's dtype
    layout  0: words innermost, x broadcast from rank 2; 1: the same with rank-3 loads; 2: rows innermost
            (words[g, w, n]: the layout w4a16_gemv.py adopted)

    python .ci/experiments/gemv_variants.py --out sweep.json          # from the repository root, on a GPU
    ncu --profile-from-start off python .ci/experiments/gemv_variants.py --sizes 8192 --ms 1 --ncu 256,64,4,1,0,2

The H200 records are reference/lab02_numerics/results/h200/gemv_sweep{1,2,3}.{json,txt} (2026-11-29). The grid of
configs was edited between the three sweeps (1: layout 0, every deq; 2: layouts 1 and 2; 3: layout 2, wider tiles);
this file holds the last one.
"""
import argparse
import json
import sys

import torch
import triton
import triton.language as tl

sys.path[:0] = ["reference", "labs", "."]
from common.bench import interleaved  # noqa: E402
from lab02_numerics.quantize import int4_quantize  # noqa: E402
from lab02_numerics.w4a16 import w4a16_matmul  # noqa: E402
from lab02_numerics.w4a16_gemv import gemv_reference, prepare_w4a16, w4a16_fast  # noqa: E402


@triton.jit
def gemv_exp(x_ptr, words_ptr, scales_ptr, out_ptr, M, N, groups_per_split, stride_xm, stride_xk, stride_om, stride_on,
             GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
             DEQ: tl.constexpr, L3: tl.constexpr = False):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    WORDS: tl.constexpr = GROUP_SIZE // 8
    rows_x = tl.arange(0, BLOCK_M)
    rows_w = tl.arange(0, BLOCK_N) + pid_n * BLOCK_N
    word = tl.arange(0, WORDS)
    in_m = rows_x < M
    in_n = rows_w < N
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), tl.float32)
    for g in range(pid_s * groups_per_split, (pid_s + 1) * groups_per_split):
        if L3:  # every tensor rank 3 from its load on: no layout conversion for the broadcasts
            words = tl.load(words_ptr + (g * N + rows_w)[None, :, None] * WORDS + word[None, None, :],
                            mask=in_n[None, :, None], other=0)
            scale = tl.load(scales_ptr + g * N + rows_w[None, :, None], mask=in_n[None, :, None], other=0.0)
        else:
            words = tl.load(words_ptr + (g * N + rows_w)[:, None] * WORDS + word[None, :], mask=in_n[:, None],
                            other=0)[None, :, :]
            scale = tl.load(scales_ptr + g * N + rows_w, mask=in_n, other=0.0)[None, :, None]
        partial = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, 1, WORDS), dtype=tl.float32)
        for i in tl.static_range(8):
            columns = g * GROUP_SIZE + i * WORDS + word
            if L3:
                x = tl.load(x_ptr + rows_x[:, None, None] * stride_xm + columns[None, None, :] * stride_xk,
                            mask=in_m[:, None, None], other=0.0).to(tl.float32)
            else:
                x = tl.load(x_ptr + rows_x[:, None] * stride_xm + columns[None, :] * stride_xk, mask=in_m[:, None],
                            other=0.0).to(tl.float32)[:, None, :]
            if DEQ == 0:
                values = ((words >> (4 * i)) & 0xF).to(tl.float32)
                x_sum += x
                partial += x * values
            elif DEQ == 1:
                codes = (words >> (4 * i)) & 0xF
                values = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8, exact
                partial += x * values
            else:
                if i < 5:  # nibble i in place: the float 2^23 + q 16^i, exact (bits 0..19 are mantissa)
                    bits = (words & (0xF << (4 * i))) | 0x4B000000
                    values = bits.to(tl.float32, bitcast=True) - 8388608.0  # q 16^i
                    xs = x * (1.0 / (16.0 ** i))  # exact: a power of two
                else:
                    bits = ((words >> (4 * i)) & 0xF) | 0x4B000000
                    values = bits.to(tl.float32, bitcast=True) - 8388608.0  # q
                    xs = x
                x_sum += x
                partial += xs * values
        if DEQ != 1:
            partial -= 8.0 * x_sum
        acc += partial * scale
    acc = tl.sum(acc, axis=2)
    out = out_ptr + rows_x[:, None] * stride_om + rows_w[None, :] * stride_on
    mask = in_m[:, None] & in_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_t(x_ptr, words_ptr, scales_ptr, out_ptr, M, N, groups_per_split, stride_xm, stride_xk, stride_om, stride_on,
           GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
           DEQ: tl.constexpr):
    """words transposed per group: (G, W, N), n contiguous, so a thread's words share their columns of x."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    WORDS: tl.constexpr = GROUP_SIZE // 8
    rows_x = tl.arange(0, BLOCK_M)
    rows_w = tl.arange(0, BLOCK_N) + pid_n * BLOCK_N
    word = tl.arange(0, WORDS)
    in_m = rows_x < M
    in_n = rows_w < N
    acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), tl.float32)
    for g in range(pid_s * groups_per_split, (pid_s + 1) * groups_per_split):
        words = tl.load(words_ptr + g * N * WORDS + word[None, :, None] * N + rows_w[None, None, :],
                        mask=in_n[None, None, :], other=0)
        scale = tl.load(scales_ptr + g * N + rows_w[None, None, :], mask=in_n[None, None, :], other=0.0)
        partial = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, WORDS, 1), dtype=tl.float32)
        for i in tl.static_range(8):
            columns = g * GROUP_SIZE + i * WORDS + word
            x = tl.load(x_ptr + rows_x[:, None, None] * stride_xm + columns[None, :, None] * stride_xk,
                        mask=in_m[:, None, None], other=0.0).to(tl.float32)
            if DEQ == 0:
                values = ((words >> (4 * i)) & 0xF).to(tl.float32) - 8.0
                partial += x * values
            elif DEQ == 1:
                values = (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                partial += x * values
            else:
                if i < 5:
                    values = ((words & (0xF << (4 * i))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    partial += (x * (1.0 / (16.0 ** i))) * values
                else:
                    values = (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    partial += x * values
                x_sum += x
        if DEQ == 2:
            partial -= 8.0 * x_sum
        acc += partial * scale
    acc = tl.sum(acc, axis=1)
    out = out_ptr + rows_x[:, None] * stride_om + rows_w[None, :] * stride_on
    mask = in_m[:, None] & in_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


SMS = None


def pick_split(N, groups, block_n, mult):
    split = 1
    while triton.cdiv(N, block_n) * split < mult * SMS and groups % (2 * split) == 0:
        split *= 2
    return split


def gemv(x, p, block_n, split, warps, deq, out_mode, l3=0, stages=1):
    M, K = x.shape
    N = p.shape[0]
    groups = K // p.group_size
    if split == 1:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    elif out_mode == 0:
        out = torch.zeros((M, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.zeros((M, N), device=x.device, dtype=x.dtype)
    if l3 == 2:
        if not hasattr(p, "_wt"):
            object.__setattr__(p, "_wt", p.words.permute(0, 2, 1).contiguous())
        gemv_t[(triton.cdiv(N, block_n), split)](
            x, p._wt, p.scales, out, M, N, groups // split, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            GROUP_SIZE=p.group_size, BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n, ATOMIC=split > 1,
            DEQ=deq, num_warps=warps, num_stages=stages)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    gemv_exp[(triton.cdiv(N, block_n), split)](
        x, p.words, p.scales, out, M, N, groups // split, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        GROUP_SIZE=p.group_size, BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n, ATOMIC=split > 1,
        DEQ=deq, L3=bool(l3), num_warps=warps, num_stages=stages)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def main():
    global SMS
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--ncu", type=str, default=None, help="one call of this config (block_n,split,warps,deq,out)")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    SMS = torch.cuda.get_device_properties(dev).multi_processor_count
    torch.manual_seed(0)
    if args.ncu:
        K = N = args.sizes[0]
        M = args.ms[0]
        bn, sp, wp, dq, om, l3 = (int(v) for v in args.ncu.split(","))
        p = prepare_w4a16(int4_quantize(torch.randn(N, K, device=dev) * 0.02, group_size=128))
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            gemv(x, p, bn, sp, wp, dq, om, l3)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        gemv(x, p, bn, sp, wp, dq, om, l3)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    record = []
    for size in args.sizes:
        K = N = size
        w = torch.randn(N, K, device=dev) * 0.02
        int4 = int4_quantize(w, group_size=128)
        p = prepare_w4a16(int4)
        copies = max(1, (256 << 20) // (N * K // 2))
        ps = [prepare_w4a16(int4_quantize(torch.randn(N, K, device=dev) * 0.02, group_size=128)) for _ in range(copies)]
        qs = [q.source for q in ps]
        bcopies = max(1, (256 << 20) // (N * K * 2))
        bs = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(bcopies)]
        groups = K // 128
        for M in args.ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            expected = gemv_reference(x, p)
            configs = {}
            stages = {}
            if M == 1:
                configs[(256, pick_split(N, groups, 256, 8), 4, 0, 0, 2)] = None  # run 2's best, fp32 atomics
                for bn in (128, 256, 512):
                    for mult in (2, 4, 8):
                        for wp in (4, 8):
                            for deq in (1, 2):
                                configs[(bn, pick_split(N, groups, bn, mult), wp, deq, 0, 2)] = None
                for mult in (1, 2):
                    c = (256, pick_split(N, groups, 256, mult), 4, 2, 0, 2)
                    stages[c + (3,)] = None
            else:
                for bn in (64, 128, 256):
                    for wp in (4, 8):
                        for deq in (1, 2):
                            configs[(bn, pick_split(N, groups, bn, 4), wp, deq, 0, 2)] = None
            configs = {c if c[1] > 1 else (*c[:4], 0, c[5]): None for c in configs}
            configs.update(stages)
            ok = {}
            for cfg in configs:
                try:
                    y = gemv(x, p, *cfg)
                    err = ((y.float() - expected).abs().max() / expected.abs().max()).item()
                    if err > 2e-2:
                        print(f"  WRONG {cfg}: {err:.2e}")
                        continue
                    ok[cfg] = err
                except Exception as e:  # noqa: BLE001
                    print(f"  FAIL {cfg}: {type(e).__name__}: {str(e)[:200]}")
            variants = {}

            def cyc(call, items):
                def run():
                    for i in range(args.calls):
                        call(items[i % len(items)])
                return run

            variants["bf16"] = cyc(lambda b: x @ b.t(), bs)
            variants["tiled"] = cyc(lambda q: w4a16_matmul(x, q), qs)
            variants["fast(default)"] = cyc(lambda q: w4a16_fast(x, q), ps)
            for cfg in ok:
                variants[str(cfg)] = cyc(lambda q, cfg=cfg: gemv(x, q, *cfg), ps)
            timed = {}
            for name, run in variants.items():
                run()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                g.replay()
                timed[name] = g.replay
            res = interleaved(timed, rounds=args.rounds, reps=3, warmup=1, device=dev)
            base = res.time("bf16").median
            rows = []
            for name in timed:
                t = res.time(name)
                r = res.ratio(name, "bf16")
                rows.append((t.median / args.calls * 1e3, name, r.low, r.median, r.high, ok.get(eval(name)) if name.startswith("(") else None))  # noqa
            rows.sort()
            print(f"K=N={size} M={M} bf16 {base / args.calls * 1e3:.2f} us/call; {len(ok)} configs")
            for us, name, lo, med, hi, err in rows[:12]:
                print(f"  {us:8.2f} us  {med:.3f}x [{lo:.3f}-{hi:.3f}]  {name}  err={err}")
            for us, name, lo, med, hi, err in rows:
                if name in ("tiled", "fast(default)", "bf16") or False:
                    print(f"  ref {us:8.2f} us  {med:.3f}x [{lo:.3f}-{hi:.3f}]  {name}")
            record.append({"size": size, "M": M, "rows": rows})
    if args.out:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "record": record}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
