"""GPU report for benchmarks/gpu_check: ``python -m benchmarks.gpu_report --out-dir DIR [--dry-run]``.

Sections, in this order (the most important first, so that a kill keeps them):

1. machine: the card, torch / triton, ``iaerf.backend_info()``, device-to-device copy bandwidth (read + write).
2. fused_loss: ``energy_regularized_cross_entropy`` per dtype and K over 2^26 logits: which implementation ran;
   the per-row loss and the gradient against float64 (fp32: relative error <= 1e-5; fp16 / bf16: no worse than the
   same-dtype torch composition's error + 1e-2); end-to-end forward+backward time and kernel-only forward and
   backward GB/s, all with CUDA events, vs the copy bandwidth; the same-dtype torch composition's time.
3. head_hvp: ``torch.ops.iaerf.head_hvp`` (the op HeadHessian calls) for n=100k, D=512, K=1000, b=10: the
   implementation (a GPU run fails when it is not the CUDA kernel: the reference would be timed), relative error
   <= 1e-5 vs float64 with TF32 off, TFLOP/s (4 n D K b flops) vs an fp32 matmul.
4. influence: energy-influence JVP pass for ResNet-32 on CIFAR-10-LT-sized random data (12,406 x 3x32x32): points
   per second vs the per-example-gradient loop, relative error <= 1e-2 vs float64 (see INFLUENCE_RTOL).
5. liger_ce: plain CE (energy_coef = 0) forward+backward next to Liger-Kernel's fused CE, when it is installed.

Every check is recorded; a section with a missed check, a non-finite value, the wrong implementation or an
exception is FAIL and the exit status is 1. After every section DIR/report.json and report.md are rewritten, and
DIR/results.json / results.md with them (``--summarize DIR`` rewrites those two from DIR/steps.tsv, written by
gpu_check, and report.json; it does not import torch, so gpu_check can call it after every step).
``--dry-run`` runs the same code on the CPU with tiny sizes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iaerf.core.io import write_text  # noqa: E402

# torch is imported inside the functions that use it: --summarize must start in a fraction of a second.

FP32_RTOL = 1e-5          # fp32 results vs float64: relative error
LOW_PRECISION_SLACK = 1e-2  # fp16 / bf16: allowed excess over the same-dtype torch composition's error
# ResNet JVPs, fp32 vs float64: a pre-activation within rounding of 0 takes the other side of a ReLU kink, so the
# normwise error is not O(eps) (measured up to 8e-4 on random inits on a CPU, where reverse mode gave 5e-7).
INFLUENCE_RTOL = 1e-2


# ---------------------------------------------------------------------------------------------------------- checks

def _new_section(**fields) -> dict:
    return {"status": "PASS", "checks": [], "problems": [], **fields}


def _check(section: dict, what: str, error: float, tolerance: float) -> None:
    """Record ``error <= tolerance`` (a NaN error misses)."""
    ok = math.isfinite(error) and error <= tolerance
    section["checks"].append({"what": what, "error": error, "tolerance": tolerance, "ok": ok})
    if not ok:
        section["problems"].append(f"{what}: error {error:.3g} > tolerance {tolerance:.3g}")


def _check_finite(section: dict, what: str, *tensors) -> None:
    import torch

    bad = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]
    section["checks"].append({"what": f"{what} finite", "ok": not bad})
    if bad:
        section["problems"].append(f"{what}: non-finite values (outputs {bad}) from finite inputs")


def _check_impl(section: dict, what: str, impl: str, expected: str) -> None:
    ok = impl == expected
    section["checks"].append({"what": f"{what} implementation", "impl": impl, "expected": expected, "ok": ok})
    if not ok:
        section["problems"].append(f"{what} ran {impl!r}, expected {expected!r}: the timings are not of the kernel")


def _finish(section: dict) -> dict:
    if section["problems"]:
        section["status"] = "FAIL"
    return section


# -------------------------------------------------------------------------------------------------------- sections

def machine(device: str, dry: bool) -> dict:
    import torch

    import iaerf
    from benchmarks.common import device_time, machine_description

    nbytes = (1 << 20) if dry else (1 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), warmup=3, reps=10, device=device)["median"]
    sec = _new_section(**machine_description(), backend=iaerf.backend_info(), copy_bytes=nbytes,
                       copy_GBps=2 * nbytes / t / 1e9,
                       tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
    if not t > 0:
        sec["problems"].append(f"copy time {t} s: the timer is broken")
    return _finish(sec)


def loss_closures(z, y, c):
    """Timing closures of one fused-loss case; none writes ``.grad`` (gradients accumulated there would add a
    read and a write of the whole gradient to every repetition).

    z: ``[N, K]`` logits with requires_grad; y: ``[N]`` targets; c: ``[N]`` float32 coefficients.
    Returns ``{"e2e", "forward", "backward", "torch"}``: fused forward+backward, fused forward only (no graph),
    fused backward only (through one retained graph), and the same-dtype torch composition forward+backward.
    """
    import torch
    import torch.nn.functional as F

    from iaerf.ops import energy_regularized_cross_entropy as ece

    zd = z.detach()
    graph = ece(z, y, c)
    return {
        "e2e": lambda: torch.autograd.grad(ece(z, y, c), z),
        "forward": lambda: ece(zd, y, c),
        "backward": lambda: torch.autograd.grad(graph, z, retain_graph=True),
        "torch": lambda: torch.autograd.grad((F.cross_entropy(z, y, reduction="none") - c * torch.logsumexp(z, 1)).mean(), z),
    }


def _loss_and_grad(fn, z):
    """Per-row loss ``[N]`` and the gradient of its sum ``[N, K]`` from ``fn(z) -> per-row loss``."""
    import torch

    z = z.detach().clone().requires_grad_(True)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def fused_loss(device: str, dry: bool, copy_GBps: float) -> dict:
    import torch
    import torch.nn.functional as F

    import iaerf
    from benchmarks.common import device_time, max_rel_error
    from iaerf.ops import registry
    from iaerf.ops import energy_regularized_cross_entropy as ece

    promised = iaerf.backend_info()["ops"]["energy_regularized_cross_entropy"][device]["impl"]
    elements = 1 << (14 if dry else 26)   # 256 MB of fp32 logits on a GPU: far past the L2 cache
    ks = (64, 1024) if dry else (1024, 8192, 131072)
    sec = _new_section(promised_impl=promised, rows=[])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in ks:
            n = elements // k
            name = f"{str(dtype).replace('torch.', '')} N={n} K={k}"
            gen = torch.Generator().manual_seed(k)
            z = (torch.randn(n, k, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
            y = torch.randint(0, k, (n,), generator=gen).to(device)
            c = (0.3 * torch.randn(n, generator=gen)).to(device)
            impl = registry.select_backend("energy_ce_forward", z, None)
            _check_impl(sec, name, impl, promised)

            loss, grad = _loss_and_grad(lambda t: ece(t, y, c, reduction="none"), z)
            ref_loss, ref_grad = _loss_and_grad(
                lambda t: F.cross_entropy(t, y, reduction="none") - c.double() * torch.logsumexp(t, 1), z.double())
            same_loss, same_grad = _loss_and_grad(
                lambda t: F.cross_entropy(t, y, reduction="none") - c * torch.logsumexp(t, 1), z)
            _check_finite(sec, name, loss, grad)
            errors = {"loss": max_rel_error(loss, ref_loss), "grad": max_rel_error(grad, ref_grad)}
            torch_errors = {"loss": max_rel_error(same_loss, ref_loss), "grad": max_rel_error(same_grad, ref_grad)}
            for what in ("loss", "grad"):
                tol = FP32_RTOL if dtype == torch.float32 else torch_errors[what] + LOW_PRECISION_SLACK
                _check(sec, f"{name} {what} vs float64", errors[what], tol)
            del loss, grad, ref_loss, ref_grad, same_loss, same_grad

            times = {key: device_time(fn, warmup=3, reps=10, device=device)["median"]
                     for key, fn in loss_closures(z, y, c).items()}
            if z.grad is not None:
                sec["problems"].append(f"{name}: a timing closure accumulated into z.grad")
            size = n * k * z.element_size()
            moved = {"e2e": 3 * size, "forward": size, "backward": 2 * size}   # backward reads z and writes dz
            gbps = {key: moved[key] / times[key] / 1e9 for key in moved}
            sec["rows"].append({"case": name, "dtype": str(dtype).replace("torch.", ""), "N": n, "K": k, "impl": impl,
                                **{f"{key}_s": t for key, t in times.items()},
                                **{f"{key}_GBps": g for key, g in gbps.items()},
                                **{f"{key}_of_copy": g / copy_GBps for key, g in gbps.items()},
                                "speedup_vs_torch": times["torch"] / times["e2e"],
                                "max_rel_err_vs_fp64": errors, "torch_max_rel_err_vs_fp64": torch_errors})
            del z
    return _finish(sec)


def head_hvp(device: str, dry: bool) -> dict:
    import torch

    from benchmarks.common import device_time, max_rel_error
    from iaerf.hessian import HeadHessian
    from iaerf.ops.head_hvp import head_hvp as op
    from iaerf.ops.reference import head_hvp_reference

    n, d, k, b = (512, 32, 10, 4) if dry else (100_000, 512, 1000, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    lin = torch.nn.Linear(d, k).to(device)
    head = HeadHessian(x, torch.zeros(n, dtype=torch.long, device=device), lin.weight, lin.bias)
    impl, reason = head.backend
    sec = _new_section(n=n, D=d, K=k, b=b, impl=impl, reason=reason)
    _check_impl(sec, "head HVP", impl, "cuda" if device == "cuda" else "cpp")
    v = torch.randn(1, b, head.num_params, generator=gen).to(device)
    m = min(n, 4000)
    got = op(head.features[:m], head.probs[:m], v, None, True)
    ref = head_hvp_reference(head.features[:m].double(), head.probs[:m].double(), v.double(), None, True)
    _check_finite(sec, "head HVP", got)
    err = max_rel_error(got, ref)
    _check(sec, "head HVP vs float64 (TF32 off)", err, FP32_RTOL)

    t = device_time(lambda: op(head.features, head.probs, v, None, True), warmup=2, reps=5, device=device)["median"]
    flops = 4 * n * d * k * b
    s = 256 if dry else 8192
    a, w = torch.randn(s, s, device=device), torch.randn(s, s, device=device)
    t_mm = device_time(lambda: a @ w, warmup=3, reps=10, device=device)["median"]
    sec.update(seconds=t, TFLOPs=flops / t / 1e12, matmul_TFLOPs=2 * s ** 3 / t_mm / 1e12, max_rel_err_vs_fp64=err)
    sec["fraction_of_matmul"] = sec["TFLOPs"] / sec["matmul_TFLOPs"]
    return _finish(sec)


def influence(device: str, dry: bool) -> dict:
    import torch

    from benchmarks.common import device_time, max_rel_error
    from iaerf.core.indexed_data import IndexedData
    from iaerf.influence.gradients import directional_derivatives, energy_from_logits
    from iaerf.longtail.models import ResNet32

    # dry run: the smallest sizes that still run every line (a ResNet-32 backward takes ~0.5 s on a small CPU)
    n, bs, m, checked = (8, 4, 2, 8) if dry else (12_406, 512, 256, 64)
    warmup, reps = (0, 1) if dry else (1, 3)
    gen = torch.Generator().manual_seed(0)
    model = ResNet32(10).to(device).eval()
    data = IndexedData((torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)), "train")
    params = {k: v.detach() for k, v in model.named_parameters()}
    direction = {k: torch.randn(v.shape, generator=gen).to(device) * 1e-2 for k, v in params.items()}
    idx = list(range(n))
    sec = _new_section(n=n, impl="torch forward-mode JVP (iaerf.influence.gradients.directional_derivatives)")

    got = directional_derivatives(model, params, direction, data, idx[:checked], batch_size=checked, device=device)
    model64 = ResNet32(10).double().to(device).eval()
    model64.load_state_dict(model.state_dict())
    p64 = {k: v.detach() for k, v in model64.named_parameters()}
    d64 = {k: v.double() for k, v in direction.items()}
    data64 = IndexedData((data.inputs.double(), data.targets), "train")
    ref = directional_derivatives(model64, p64, d64, data64, idx[:checked], batch_size=checked, device=device)
    _check_finite(sec, "energy influence", got)
    err = max_rel_error(got, ref)
    _check(sec, "energy influence vs float64 (TF32 off)", err, INFLUENCE_RTOL)

    t = device_time(lambda: directional_derivatives(model, params, direction, data, idx, batch_size=bs, device=device),
                    warmup=warmup, reps=reps, device=device)["median"]

    def per_example_loop():   # the per-example-gradient loop (torch-influence style) on m points, extrapolated
        for i in range(m):
            x, _ = data.batch([i], device)
            g = torch.autograd.grad(energy_from_logits(model(x)).sum(), list(model.parameters()))
            sum((gi * direction[k]).sum() for gi, k in zip(g, params))

    t_loop = device_time(per_example_loop, warmup=warmup, reps=reps, device=device)["median"] * n / m
    sec.update(jvp_pass_s=t, points_per_s=n / t, per_example_loop_s_extrapolated=t_loop,
               speedup_vs_per_example=t_loop / t, max_rel_err_vs_fp64=err)
    return _finish(sec)


def liger_ce(device: str, dry: bool) -> dict:
    """Plain CE (energy_coef = 0) forward+backward: iaerf vs Liger-Kernel's fused CE vs torch; SKIP without Liger."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - a peer library that does not import is no failure of iaerf
        return {"status": "SKIP", "checks": [], "problems": [], "detail": f"liger-kernel unavailable: {exc}"}
    import torch
    import torch.nn.functional as F

    from benchmarks.common import device_time
    from iaerf.ops import energy_regularized_cross_entropy as ece

    liger = LigerCrossEntropyLoss()
    sec = _new_section(rows=[])
    for n, k in ((256, 1024),) if dry else ((16384, 32768), (4096, 131072)):
        gen = torch.Generator().manual_seed(k)
        z0 = (torch.randn(n, k, generator=gen) * 3).to(device)
        y = torch.randint(0, k, (n,), generator=gen).to(device)
        times = {}
        for name, fn in (("iaerf", lambda z: ece(z, y, 0.0)), ("liger", lambda z: liger(z, y)),
                         ("torch", lambda z: F.cross_entropy(z, y))):
            z = z0.clone().requires_grad_(True)   # Liger writes the gradient into its input: a copy per library
            times[name] = device_time(lambda: torch.autograd.grad(fn(z), z), warmup=3, reps=10, device=device)["median"]
        sec["rows"].append({"N": n, "K": k, **{f"{name}_s": t for name, t in times.items()}})
    return _finish(sec)


# --------------------------------------------------------------------------------------------------------- results

def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def report_markdown(report: dict) -> str:
    """Markdown of the sections finished so far (report: as written to report.json)."""
    secs = report["sections"]
    m = secs.get("machine", {})
    lines = [f"# iaerf GPU report: {m.get('gpu') or 'CPU dry run'} (torch {m.get('torch')}, triton {m.get('triton')})",
             "", "| section | status | seconds | problems |", "|---|---|---|---|"]
    for name, s in secs.items():
        problems = "; ".join(s.get("problems", [])) or s.get("detail", "")
        lines.append(f"| {name} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {problems.replace('|', '/')} |")
    if "copy_GBps" in m:
        lines += ["", f"Device copy bandwidth (read + write): {m['copy_GBps']:.0f} GB/s; TF32: {m['tf32']}"]
    if secs.get("fused_loss", {}).get("rows"):
        lines += ["", "| fused energy loss | impl | fwd GB/s | bwd GB/s | fwd+bwd GB/s (% of copy) | vs torch "
                  "| rel err loss / grad | torch same dtype |", "|---|---|---|---|---|---|---|---|"]
        for r in secs["fused_loss"]["rows"]:
            e, te = r["max_rel_err_vs_fp64"], r["torch_max_rel_err_vs_fp64"]
            lines.append(f"| {r['case']} | {r['impl']} | {r['forward_GBps']:.0f} | {r['backward_GBps']:.0f} "
                         f"| {r['e2e_GBps']:.0f} ({100 * r['e2e_of_copy']:.0f}%) | {r['speedup_vs_torch']:.2f}x "
                         f"| {e['loss']:.1e} / {e['grad']:.1e} | {te['loss']:.1e} / {te['grad']:.1e} |")
    h = secs.get("head_hvp", {})
    if "TFLOPs" in h:
        lines += ["", "| head HVP | impl | TFLOP/s | fp32 matmul TFLOP/s | fraction | rel err vs fp64 |",
                  "|---|---|---|---|---|---|",
                  f"| n={h['n']} D={h['D']} K={h['K']} b={h['b']} | {h['impl']} | {h['TFLOPs']:.2f} "
                  f"| {h['matmul_TFLOPs']:.2f} | {100 * h['fraction_of_matmul']:.0f}% | {h['max_rel_err_vs_fp64']:.1e} |"]
    f = secs.get("influence", {})
    if "points_per_s" in f:
        lines += ["", "| energy influence JVP pass, ResNet-32 | points/s | vs per-example loop | rel err vs fp64 |",
                  "|---|---|---|---|",
                  f"| n={f['n']} | {f['points_per_s']:.0f} | {f['speedup_vs_per_example']:.1f}x "
                  f"| {f['max_rel_err_vs_fp64']:.1e} |"]
    if secs.get("liger_ce", {}).get("rows"):
        lines += ["", "| plain CE fwd+bwd (coef 0) | iaerf | Liger-Kernel | torch |", "|---|---|---|---|"]
        lines += [f"| N={r['N']} K={r['K']} | {1e3 * r['iaerf_s']:.2f} ms | {1e3 * r['liger_s']:.2f} ms "
                  f"| {1e3 * r['torch_s']:.2f} ms |" for r in secs["liger_ce"]["rows"]]
    return "\n".join(lines) + "\n"


def read_steps(out_dir: str) -> list[dict]:
    """gpu_check's finished steps, from OUT_DIR/steps.tsv (name, status, seconds, budget, log, detail per line)."""
    path = os.path.join(out_dir, "steps.tsv")
    if not os.path.exists(path):
        return []
    keys = ("name", "status", "seconds", "budget_s", "log", "detail")
    with open(path) as fh:
        steps = [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in fh if line.strip()]
    for s in steps:
        s["seconds"], s["budget_s"] = int(s["seconds"]), int(s["budget_s"])
    return steps


def write_results(out_dir: str) -> None:
    """OUT_DIR/results.json and results.md from gpu_check's steps and the report's finished sections."""
    steps = read_steps(out_dir)
    report_path = os.path.join(out_dir, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else None
    write_text(os.path.join(out_dir, "results.json"), json.dumps({"steps": steps, "report": report}, indent=1))
    lines = ["# iaerf gpu_check results", ""]
    if steps:
        lines += ["| step | status | seconds / budget | detail |", "|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']} / {s['budget_s']} | {s['detail'].replace('|', '/')} |"
                  for s in steps]
        lines.append("")
    if report is not None:
        lines.append(report_markdown(report))
    write_text(os.path.join(out_dir, "results.md"), "\n".join(lines) + "\n")


def _write_report(out_dir: str, report: dict) -> None:
    write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    write_text(os.path.join(out_dir, "report.md"), report_markdown(report))
    write_results(out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out-dir", help="folder for report.json / report.md and results.json / results.md")
    group.add_argument("--summarize", metavar="OUT_DIR", help="only rewrite OUT_DIR/results.json and results.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script without a GPU")
    args = parser.parse_args(argv)
    if args.summarize:
        write_results(args.summarize)
        return 0

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: use --dry-run")
    # Accuracy is checked at fp32 precision: TF32 matmuls / convolutions carry ~1e-3 relative errors.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    report = {"device": device, "dry_run": args.dry_run, "sections": {}}
    sections = (("machine", lambda: machine(device, args.dry_run)),
                ("fused_loss", lambda: fused_loss(device, args.dry_run,
                                                  report["sections"]["machine"].get("copy_GBps", float("nan")))),
                ("head_hvp", lambda: head_hvp(device, args.dry_run)),
                ("influence", lambda: influence(device, args.dry_run)),
                ("liger_ce", lambda: liger_ce(device, args.dry_run)))
    for name, run in sections:
        print(f"--- {name}", flush=True)
        t0 = time.perf_counter()
        torch.manual_seed(0)   # the model initialisations: the same numbers on every run
        try:
            sec = run()
        except Exception:  # noqa: BLE001 - a broken section is a FAIL with its traceback; the next ones still run
            sec = {"status": "FAIL", "checks": [], "problems": [traceback.format_exc(limit=8).strip().splitlines()[-1]],
                   "traceback": traceback.format_exc()}
            print(sec["traceback"], file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
        sec["seconds"] = time.perf_counter() - t0
        report["sections"][name] = sec
        _write_report(args.out_dir, report)
        print(f"{name}: {sec['status']}" + "".join(f"\n  PROBLEM: {p}" for p in sec["problems"]), flush=True)
    print(report_markdown(report))
    print("detail:", ", ".join(f"{name} {s['status']}" for name, s in report["sections"].items()))
    failed = [name for name, s in report["sections"].items() if s["status"] == "FAIL"]
    if failed:
        print(f"gpu_report: FAILED sections {failed}; details in {os.path.join(args.out_dir, 'report.json')}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
