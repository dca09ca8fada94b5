"""HeadHessian and the native iaerf::head_hvp op vs the generic torch.func HVP and dense float64 references."""
import pytest
import torch
from torch import nn

from iaerf.core import extension as _extension
from iaerf.hessian import HeadHessian, ModuleHessian
from iaerf.ops import registry
from iaerf.ops.reference import head_hvp_reference

from _cuda import cuda_path_missing, needs_cuda


pytestmark = pytest.mark.usefixtures("one_thread")

native = pytest.mark.skipif(not registry.has_compiled_kernel("head_hvp", "cpu"), reason="iaerf._C with head_hvp not built")


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _problem(n, D, K, dtype, bias=True, logit_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    lin = nn.Linear(D, K, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(K, D, generator=g, dtype=torch.float64) * logit_scale)
        if bias:
            lin.bias.copy_(torch.randn(K, generator=g, dtype=torch.float64))
    y = torch.randint(0, K, (n,), generator=g)
    return x.to(dtype), y, lin.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 5, 3), (300, 9, 1), (129, 4, 17)])   # odd K, K=1, more classes than D
def test_head_matches_generic_hvp(dtype, tol, bias, shape):
    n, D, K = shape
    x, y, lin = _problem(n, D, K, dtype, bias)
    head = HeadHessian(x, y, lin.weight, lin.bias, weight_decay=0.01)
    ref_op = ModuleHessian(lin.double(), (x.double(), y), weight_decay=0.01, batch_size=64)
    V = torch.randn(4, head.num_params, dtype=torch.float64)
    ref = ref_op.matvec(V)
    assert _rel(head.matvec(V.to(dtype)), ref) <= tol
    assert _rel(head.dense(), ref_op.dense()) <= 1e-12
    idx = torch.randint(0, n, (3, 11))
    V3 = torch.randn(3, 4, head.num_params, dtype=torch.float64)
    assert _rel(head.minibatch_matvec(V3.to(dtype), idx), ref_op.minibatch_matvec(V3, idx)) <= tol


def test_confident_rows_fp32():
    # logits of size ~60: p_y ~ 1 on most rows, the curvature is tiny and cancellation-prone
    x, y, lin = _problem(200, 8, 6, torch.float32, logit_scale=20.0, seed=3)
    head = HeadHessian(x, y, lin.weight, lin.bias, weight_decay=1e-3)
    ref = ModuleHessian(lin.double(), (x.double(), y), weight_decay=1e-3)
    V = torch.randn(3, head.num_params, dtype=torch.float64)
    assert _rel(head.matvec(V.float()), ref.matvec(V)) <= 1e-6


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_equals_reference_with_tiles_and_indices(dtype):
    x, y, lin = _problem(103, 7, 5, dtype)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(2, 3, head.num_params, dtype=dtype)
    idx = torch.randint(0, 103, (2, 41))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for indices in (None, idx):
        for tile in (0, 1, 10, 1000):
            a = torch.ops.iaerf.head_hvp(head.features, head.probs, V, indices, True, tile)
            b = head_hvp_reference(head.features.double(), head.probs.double(), V.double(), indices, True, 7)
            assert _rel(a, b) <= tol


@native
def test_opcheck():
    x, y, lin = _problem(20, 4, 3, torch.float64)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(2, 2, head.num_params, dtype=torch.float64)
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default, (head.features, head.probs, V, None, True, 0))
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default,
                          (head.features, head.probs, V, torch.randint(0, 20, (2, 5)), True, 3))
    Vw = V[..., : 3 * 4].contiguous()
    torch.library.opcheck(torch.ops.iaerf.head_hvp.default, (head.features, head.probs, Vw, None, False, 0))


@native
def test_native_op_rejects_bad_shapes():
    x, y, lin = _problem(10, 4, 3, torch.float32)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    with pytest.raises(RuntimeError, match="P="):
        torch.ops.iaerf.head_hvp(head.features, head.probs, torch.randn(1, 1, 5), None, True, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.iaerf.head_hvp(head.features, head.probs, torch.randn(1, 1, 15, dtype=torch.float64), None, True, 0)


def test_reference_path_when_native_forced_off(monkeypatch):
    x, y, lin = _problem(50, 6, 4, torch.float64)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    V = torch.randn(3, head.num_params, dtype=torch.float64)
    fast = head.matvec(V)
    monkeypatch.setenv("IAERF_FORCE_REFERENCE", "1")
    assert head.backend[0] == "reference"
    assert _rel(head.matvec(V), fast) <= 1e-12


def test_from_module_extracts_frozen_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    net.train()
    with torch.no_grad():
        net(x + 3)  # running stats != batch stats
    head = HeadHessian.from_module(net, "3", (x, y), batch_size=16, weight_decay=0.05)
    assert net.training
    generic = ModuleHessian(net, (x, y), params=["3"], weight_decay=0.05)
    V = torch.randn(2, head.num_params, dtype=torch.float64)
    assert _rel(head.matvec(V), generic.matvec(V)) <= 1e-12
    with pytest.raises(ValueError, match="nn.Linear"):
        HeadHessian.from_module(net, "1", (x, y))


def test_bad_inputs():
    x, y, lin = _problem(10, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="features"):
        HeadHessian(x[:, :3], y, lin.weight, lin.bias)
    with pytest.raises(ValueError, match="empty"):
        HeadHessian(x[:0], y[:0], lin.weight, lin.bias)
    with pytest.raises(ValueError, match="labels"):
        HeadHessian(x, y[:4], lin.weight, lin.bias)
    with pytest.raises(ValueError, match="bias"):
        HeadHessian(x, y, lin.weight, lin.bias[:2])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features"):
        HeadHessian(bad, y, lin.weight, lin.bias)
    head = HeadHessian(x, y, lin.weight, lin.bias)
    with pytest.raises(TypeError, match="dtype"):
        head.matvec(torch.randn(head.num_params, dtype=torch.float64))
    with pytest.raises(ValueError, match="length"):
        head.matvec(torch.randn(2, head.num_params - 1))


def _tied_probs(n, K, seed=0):
    """``[n, K]`` float64 rows with 2-4 equal maxima at random places (K > 1), half of them not normalised.

    Where sum p != 1 the mix's result depends on which maximum m it subtracts (through u_m * (1 - sum p)), so an
    implementation that does not take the first maximum, as torch.argmax and the float64 reference do, is off by
    O(1) rather than by rounding."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, K, generator=g, dtype=torch.float64) * 0.5 + 0.01
    for i in range(n):
        ties = torch.randint(0, K, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        p[i, ties] = 0.75
    p[::2] /= p[::2].sum(1, keepdim=True)
    return p


@native
@pytest.mark.parametrize("K", [5, 33, 1000])
def test_native_ties_pick_first_maximum(K):
    n, D = 21, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    p = _tied_probs(n, K)
    V = torch.randn(1, 2, K * D + K, generator=g, dtype=torch.float64)
    want = head_hvp_reference(x, p, V, None, True, 0)
    assert _rel(torch.ops.iaerf.head_hvp(x, p, V, None, True, 0), want) <= 1e-12
    # the check has teeth: the last maximum instead of the first moves the result by far more than rounding
    last = p.shape[1] - 1 - p.flip(1).argmax(1)
    assert bool((last != p.argmax(1)).any())
    assert _rel(_mix_with_max_at(x, p, V, last), want) > 1e-3


def _mix_with_max_at(x, p, V, m):
    """head_hvp (all rows, with bias, one repeat) with the maximum index m [n] given instead of argmax p."""
    K, D = p.shape[1], x.shape[1]
    u = (x @ V[0, :, : K * D].reshape(-1, K, D).transpose(1, 2)).transpose(0, 1) + V[0, :, K * D:]   # [n, b, K]
    du = u - u.gather(-1, m[:, None, None].expand(-1, u.shape[1], 1))
    rr = p[:, None] * (du - (p[:, None] * du).sum(-1, keepdim=True))
    return torch.cat([torch.einsum("nbk,nd->bkd", rr, x).flatten(1), rr.sum(0)], 1)[None]


@pytest.fixture
def cuda_head_kernel():
    """The CUDA kernel of iaerf::head_hvp, fp32 GEMMs in full fp32 (TF32 off) while the test runs.

    A missing kernel would make HeadHessian fall back to the torch reference on the GPU: that is a skip here, and a
    failure under IAERF_REQUIRE_CUDA=1 (tests/_cuda.py), never a pass."""
    if not registry.has_compiled_kernel("head_hvp", "cuda"):
        why = _extension.extension_error() or "iaerf._C was built without its CUDA kernels"
        cuda_path_missing(f"the CUDA kernel of iaerf::head_hvp is not available ({why})")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.ops.iaerf.head_hvp
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


CUDA_TOLS = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


def _close(got, want, tol):
    """Max error within tol of want's largest entry; exactly zero where want is (K = 1: p = 1, no curvature)."""
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    return err <= tol * scale if scale > 0 else err == 0.0


def _cuda_problem(n, D, K, dtype, bias, device="cuda"):
    """HeadHessian on ``device`` in ``dtype`` and the float64 CPU inputs it was built from (features and probs
    rounded to dtype, so the reference sees exactly the kernel's inputs)."""
    x, y, lin = _problem(n, D, K, torch.float64, bias, logit_scale=3.0)
    gpu = HeadHessian(x.to(device, dtype), y.to(device), lin.weight.to(device, dtype),
                      lin.bias.to(device, dtype) if bias else None)
    assert gpu.backend[0] == "cuda", gpu.backend
    return gpu, gpu.features.cpu().double(), gpu.probs.cpu().double()


@needs_cuda
@pytest.mark.parametrize("dtype, tol", CUDA_TOLS)
@pytest.mark.parametrize("shape", [(37, 5, 1), (300, 9, 33), (129, 4, 1000)])   # K=1, K > warp, K = 1000
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_matches_cpu_reference(cuda_head_kernel, dtype, tol, shape, bias):
    n, D, K = shape
    gpu, x64, p64 = _cuda_problem(n, D, K, dtype, bias)
    V = torch.randn(2, 3, gpu.num_params, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, n, (2, 50))
    for indices in (None, idx):
        for tile in (0, 13, 64):   # n and 50 are multiples of neither 13 nor 64; the default tile holds all rows
            want = head_hvp_reference(x64, p64, V.double(), indices, bias, 0)
            dev_idx = indices.cuda() if indices is not None else None
            got = cuda_head_kernel(gpu.features, gpu.probs, V.cuda(), dev_idx, bias, tile)
            assert got.dtype == dtype and got.is_cuda
            assert bool(torch.isfinite(got).all())
            assert _close(got.cpu(), want, tol), (indices is not None, tile)
    want = head_hvp_reference(x64, p64, V[:1].double(), None, bias, 0)[0] / n
    assert _close(gpu.matvec(V[0].cuda()).cpu(), want, tol)


@needs_cuda
@pytest.mark.parametrize("dtype, tol", CUDA_TOLS)
@pytest.mark.parametrize("K", [5, 33, 1000])
def test_cuda_ties_pick_first_maximum(cuda_head_kernel, dtype, tol, K):
    n, D = 21, 3
    x = torch.randn(n, D, dtype=torch.float64).to(dtype)
    p = _tied_probs(n, K).to(dtype)
    V = torch.randn(2, 3, K * D + K, dtype=torch.float64).to(dtype)
    want = head_hvp_reference(x.double(), p.double(), V.double(), None, True, 0)
    got = cuda_head_kernel(x.cuda(), p.cuda(), V.cuda(), None, True, 0)
    assert _close(got.cpu(), want, tol)


@needs_cuda
@pytest.mark.parametrize("dtype, tol", CUDA_TOLS)
def test_cuda_non_contiguous_inputs(cuda_head_kernel, dtype, tol):
    n, D, K = 45, 6, 33
    gpu, x64, p64 = _cuda_problem(n, D, K, dtype, True)
    V = torch.randn(2, 3, 2 * gpu.num_params, dtype=torch.float64).to(dtype)
    V_strided = V.cuda()[..., ::2]                                   # every other entry: strided last dim
    features_t = gpu.features.t().contiguous().t()                   # column-major [n, D]
    probs_wide = torch.cat([gpu.probs, gpu.probs], 1)[:, :K]         # row stride 2K
    assert not (V_strided.is_contiguous() or features_t.is_contiguous() or probs_wide.is_contiguous())
    want = head_hvp_reference(x64, p64, V[..., ::2].double(), None, True, 0)
    got = cuda_head_kernel(features_t, probs_wide, V_strided, None, True, 7)
    assert _close(got.cpu(), want, tol)
    vectors = V[0].cuda().t().contiguous().t()[:, ::2]               # matvec on a strided [b, P] batch
    assert not vectors.is_contiguous()
    assert _close(gpu.matvec(vectors).cpu(), want[0] / n, tol)


@needs_cuda
@pytest.mark.parametrize("dtype, tol", CUDA_TOLS)
def test_cuda_second_device(cuda_head_kernel, dtype, tol):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    current = torch.cuda.current_device()
    gpu, x64, p64 = _cuda_problem(77, 5, 33, dtype, True, device="cuda:1")
    V = torch.randn(1, 3, gpu.num_params, dtype=torch.float64).to(dtype)
    got = cuda_head_kernel(gpu.features, gpu.probs, V.to("cuda:1"), None, True, 0)
    assert got.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == current
    assert _close(got.cpu(), head_hvp_reference(x64, p64, V.double(), None, True, 0), tol)
