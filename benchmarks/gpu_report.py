"""GPU headline numbers for benchmarks/gpu_check: ``python -m benchmarks.gpu_report --out FILE [--dry-run]``.

1. Fused energy loss (forward+backward) effective GB/s vs the measured device copy bandwidth, and vs eager.
2. Head HVP TFLOP/s (4 n D K b flops) vs a measured fp32 matmul rate.
3. Energy influence throughput (training points per second of the JVP pass) for ResNet-32 on CIFAR-10-LT-sized
   random data (12,406 x 3x32x32), vs the per-example-gradient loop.
Each with its max relative error vs float64. Prints a short table last; writes JSON + markdown to ``--out``.
``--dry-run`` runs the same code on the CPU with tiny sizes (to check the script without a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_description, max_rel_error, time_fn  # noqa: E402
from iaerf._io import write_text  # noqa: E402


def copy_bandwidth(device, nbytes: int) -> float:
    """Device-to-device copy: bytes read + bytes written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, reps=10, device=device)["median"]
    return 2 * nbytes / t


def fused_loss(device, dry: bool) -> list[dict]:
    from iaerf.ops import energy_regularized_cross_entropy

    elements = 1 << (16 if dry else 26)   # 256 MB of fp32 logits on a GPU (>= 64 MB as the target asks)
    ks = (64, 1024) if dry else (1024, 8192, 32768, 131072)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for k in ks:
            n = elements // k
            gen = torch.Generator(device="cpu").manual_seed(k)
            z = (torch.randn(n, k, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
            y = torch.randint(0, k, (n,), generator=gen).to(device)
            c = (0.3 * torch.randn(n, generator=gen)).to(device)

            def fused():
                energy_regularized_cross_entropy(z, y, c).backward()

            def eager():
                zf = z.float()
                ((F.cross_entropy(zf, y, reduction="none") + c * -torch.logsumexp(zf, 1)).mean()).backward()

            t_fused = time_fn(fused, warmup=3, reps=10, device=device)["median"]
            t_eager = time_fn(eager, warmup=3, reps=10, device=device)["median"]
            z.grad = None
            loss = energy_regularized_cross_entropy(z, y, c)
            loss.backward()
            z64 = z.detach().double().requires_grad_(True)
            ref = (F.cross_entropy(z64, y, reduction="none") + c.double() * -torch.logsumexp(z64, 1)).mean()
            ref.backward()
            err = max(max_rel_error(loss, ref), max_rel_error(z.grad, z64.grad))
            bytes_moved = 3 * n * k * z.element_size()   # forward reads z; backward reads z and writes dz
            out.append({"dtype": str(dtype).replace("torch.", ""), "N": n, "K": k, "fused_s": t_fused,
                        "eager_s": t_eager, "GBps": bytes_moved / t_fused / 1e9, "speedup_vs_eager": t_eager / t_fused,
                        "max_rel_err_vs_fp64": err})
            del z, z64
    return out


def liger_comparison(device, dry: bool) -> list[dict] | None:
    """Plain CE (energy_coef = 0) fwd+bwd: iaerf vs Liger-Kernel's fused CE vs eager; None when Liger is absent."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    from iaerf.ops import energy_regularized_cross_entropy

    liger = LigerCrossEntropyLoss()
    out = []
    for n, k in ((256, 1024),) if dry else ((16384, 32768), (4096, 131072)):
        gen = torch.Generator().manual_seed(k)
        z0 = (torch.randn(n, k, generator=gen) * 3).to(device)
        y = torch.randint(0, k, (n,), generator=gen).to(device)
        times = {}
        for name, fn in (("iaerf", lambda z: energy_regularized_cross_entropy(z, y, 0.0)),
                         ("liger", lambda z: liger(z, y)), ("eager", lambda z: F.cross_entropy(z, y))):
            z = z0.clone().requires_grad_(True)   # Liger writes the gradient into its input: a fresh copy each
            times[name] = time_fn(lambda: fn(z).backward(), warmup=3, reps=10, device=device)["median"]
        out.append({"N": n, "K": k, **{f"{name}_s": t for name, t in times.items()}})
    return out


def head_hvp(device, dry: bool) -> dict:
    from iaerf.hessian.head import head_hvp as op, head_hvp_reference

    n, d, k, b = (512, 32, 10, 4) if dry else (100_000, 512, 1000, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    p = torch.softmax(torch.randn(n, k, generator=gen), 1).to(device)
    v = torch.randn(1, b, k * d + k, generator=gen).to(device)
    t = time_fn(lambda: op(x, p, v, None, True), warmup=2, reps=5, device=device)["median"]
    flops = 4 * n * d * k * b
    a = torch.randn(n, d, device=device)
    w = torch.randn(d, k * b, device=device)
    t_mm = time_fn(lambda: a @ w, warmup=3, reps=10, device=device)["median"]
    rate_mm = 2 * n * d * k * b / t_mm
    m = min(n, 4000)
    got = op(x[:m], p[:m], v, None, True)
    ref = head_hvp_reference(x[:m].double(), p[:m].double(), v.double(), None, True)
    return {"n": n, "D": d, "K": k, "b": b, "seconds": t, "TFLOPs": flops / t / 1e12, "matmul_TFLOPs": rate_mm / 1e12,
            "fraction_of_matmul": (flops / t) / rate_mm, "max_rel_err_vs_fp64": max_rel_error(got, ref)}


def influence_throughput(device, dry: bool) -> dict:
    from iaerf.influence.data import IndexedData
    from iaerf.influence.gradients import directional_derivatives, energy_from_logits
    from iaerf.models import ResNet32

    n = 64 if dry else 12_406
    gen = torch.Generator().manual_seed(0)
    model = ResNet32(10).to(device).eval()
    data = IndexedData((torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)), "train")
    params = {k: v.detach() for k, v in model.named_parameters()}
    direction = {k: torch.randn(v.shape, generator=gen).to(device) * 1e-2 for k, v in params.items()}
    idx = list(range(n))
    bs = 32 if dry else 512

    def jvp_pass():
        return directional_derivatives(model, params, direction, data, idx, batch_size=bs, device=device)

    t = time_fn(jvp_pass, warmup=1, reps=3, device=device)["median"]
    # the per-example-gradient loop (torch-influence style) on a few hundred points, extrapolated
    m = 32 if dry else 256
    def per_example_loop():
        for i in range(m):
            x, y = data.batch([i], device)
            g = torch.autograd.grad(energy_from_logits(model(x)).sum(), list(model.parameters()))
            sum((gi * direction[k]).sum() for gi, k in zip(g, params))
    t_loop = time_fn(per_example_loop, warmup=1, reps=2, device=device)["median"] * n / m
    got = directional_derivatives(model, params, direction, data, idx[:64], batch_size=64, device=device)
    model64 = ResNet32(10).double().to(device).eval()
    model64.load_state_dict(model.state_dict())
    p64 = {k: v.detach() for k, v in model64.named_parameters()}
    d64 = {k: v.double() for k, v in direction.items()}
    data64 = IndexedData((data.inputs.double(), data.targets), "train")
    ref = directional_derivatives(model64, p64, d64, data64, idx[:64], batch_size=64, device=device)
    return {"n": n, "jvp_pass_s": t, "points_per_s": n / t, "per_example_loop_s_extrapolated": t_loop,
            "speedup_vs_per_example": t_loop / t, "max_rel_err_vs_fp64": max_rel_error(got, ref)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the full results (markdown; JSON beside it)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script without a GPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run")
    machine = machine_description()
    bw = copy_bandwidth(device, (1 << 20) if args.dry_run else (1 << 30))
    results = {"machine": machine, "copy_GBps": bw / 1e9}
    results["fused_loss"] = fused_loss(device, args.dry_run)
    results["liger_ce"] = liger_comparison(device, args.dry_run)
    results["head_hvp"] = head_hvp(device, args.dry_run)
    results["influence"] = influence_throughput(device, args.dry_run)

    lines = [f"# iaerf GPU check: {machine['gpu'] or 'CPU dry run'} (torch {machine['torch']}, triton {machine['triton']})",
             "", f"Device copy bandwidth: {bw / 1e9:.0f} GB/s", "",
             "| fused energy loss fwd+bwd | GB/s | % of copy BW | vs eager | max rel err vs fp64 |", "|---|---|---|---|---|"]
    for r in results["fused_loss"]:
        lines.append(f"| {r['dtype']} N={r['N']} K={r['K']} | {r['GBps']:.0f} | {100 * r['GBps'] * 1e9 / bw:.0f}% "
                     f"| {r['speedup_vs_eager']:.2f}x | {r['max_rel_err_vs_fp64']:.1e} |")
    if results["liger_ce"]:
        lines += ["", "| plain CE fwd+bwd (coef 0) | iaerf | Liger-Kernel | eager |", "|---|---|---|---|"]
        lines += [f"| N={r['N']} K={r['K']} | {1e3 * r['iaerf_s']:.2f} ms | {1e3 * r['liger_s']:.2f} ms "
                  f"| {1e3 * r['eager_s']:.2f} ms |" for r in results["liger_ce"]]
    h = results["head_hvp"]
    lines += ["", "| head HVP | TFLOP/s | matmul TFLOP/s | fraction | max rel err vs fp64 |", "|---|---|---|---|---|",
              f"| n={h['n']} D={h['D']} K={h['K']} b={h['b']} | {h['TFLOPs']:.2f} | {h['matmul_TFLOPs']:.2f} "
              f"| {100 * h['fraction_of_matmul']:.0f}% | {h['max_rel_err_vs_fp64']:.1e} |"]
    f = results["influence"]
    lines += ["", "| energy influence JVP pass, ResNet-32 | points/s | vs per-example loop | max rel err vs fp64 |",
              "|---|---|---|---|",
              f"| n={f['n']} (CIFAR-10-LT size) | {f['points_per_s']:.0f} | {f['speedup_vs_per_example']:.1f}x "
              f"| {f['max_rel_err_vs_fp64']:.1e} |"]
    text = "\n".join(lines) + "\n"
    write_text(args.out, text)
    write_text(os.path.splitext(args.out)[0] + ".json", json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
