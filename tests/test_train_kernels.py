"""The training kernels (llamas._C.ops: matmul_tn, column_sum, layernorm_backward, gelu_backward,
cross_entropy, attention_forward/backward, embedding_backward, adamw) against float64 numpy
references, at odd and round sizes, for every kernel variant this CPU can run. Where a reference
backward is not a textbook closed form, the reference itself is first checked against central
differences of the float64 forward. Also: determinism (run to run and across thread counts),
extreme logits, repeated embedding ids, AdamW as torch.optim.AdamW, and bad-input errors."""
import numpy as np
import pytest

import llamas
from llamas import _C
from tolerances import TOLERANCES, matmul_scale

ops = _C.ops
VARIANTS = list(_C.available_kernel_variants())

# Central differences of float64 functions with step h = 1e-6 have truncation error ~h^2 |f'''| and
# cancellation error ~1e-16 |f| / h = 1e-10 |f|; 1e-6 relative (plus 1e-8 absolute) is far above both
# for the O(1) inputs used below, and far below the error of any wrong formula.
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}
FD_STEP = 1e-6


from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)


def assert_close(actual, expected, dtype="float32", scale=None, what=""):
    """|actual - expected| <= atol + rtol * scale elementwise (scale: error scale of the computation)."""
    tol = TOLERANCES[dtype]
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = np.abs(expected) if scale is None else np.broadcast_to(scale, expected.shape)
    err = np.abs(actual.astype(np.float64) - expected)
    bound = tol["atol"] + tol["rtol"] * scale
    if err.size == 0:
        return
    worst = np.argmax(err - bound)
    idx = np.unravel_index(worst, err.shape)
    assert np.all(err <= bound), (
        f"{what} max violation at {idx}: got {actual[idx]!r}, expected {expected[idx]!r}, "
        f"err {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g}")


def central_difference(f, x, h=FD_STEP):
    """d f / d x for scalar f of a float64 array x, by central differences over every entry."""
    x = x.astype(np.float64).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + h
        up = f(x)
        x[i] = orig - h
        down = f(x)
        x[i] = orig
        grad[i] = (up - down) / (2 * h)
    return grad


def assert_fd_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=FD_TOL["rtol"], atol=FD_TOL["atol"])


def with_threads(n, fn):
    before = llamas.get_num_threads()
    try:
        llamas.set_num_threads(n)
        return fn()
    finally:
        llamas.set_num_threads(before)


# ---- float64 references ---------------------------------------------------------------------------

def layernorm_ref(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + eps)
    return (x - mean) * rstd * w + b


def layernorm_backward_ref(dout, x, w, eps=1e-5):
    """Returns (dx, dw, db, error scales of dx, dw, db)."""
    dout, x, w = (t.astype(np.float64) for t in (dout, x, w))
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    dn = dout * w
    m1 = dn.mean(-1, keepdims=True)
    m2 = (dn * xhat).mean(-1, keepdims=True)
    dx = (dn - m1 - xhat * m2) * rstd
    dw = (dout * xhat).sum(0)
    db = dout.sum(0)
    # float32 rounding scales with the magnitudes of the terms combined, not the (cancelling) result.
    # xhat = (x - mean) * rstd is rounded relative to its operands: its error is ~2^-24 kappa with
    # kappa = (|x| + |mean|) rstd, which dominates |xhat| when x - mean cancels (nearly constant
    # rows). To first order that error enters dx through xhat * m2 as kappa |m2| + |xhat| |dm2|.
    ax, kappa, adn = np.abs(xhat), (np.abs(x) + np.abs(mean)) * rstd, np.abs(dn)
    dx_scale = (adn + adn.mean(-1, keepdims=True) + ax * (adn * ax).mean(-1, keepdims=True)
                + kappa * (adn * ax).mean(-1, keepdims=True) + ax * (adn * kappa).mean(-1, keepdims=True)) * rstd
    dw_scale = (np.abs(dout) * (ax + kappa)).sum(0)
    return dx, dw, db, dx_scale, dw_scale, np.abs(dout).sum(0)


GELU_S = np.sqrt(2 / np.pi)


def gelu_ref(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1 + np.tanh(GELU_S * (x + 0.044715 * x ** 3)))


def gelu_grad_ref(x):
    """Closed-form derivative of the tanh GELU, and the magnitude of its two terms (error scale)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.tanh(GELU_S * (x + 0.044715 * x ** 3))
    term1 = 0.5 * (1 + t)
    term2 = 0.5 * x * (1 - t * t) * GELU_S * (1 + 3 * 0.044715 * x ** 2)
    return term1 + term2, np.abs(term1) + np.abs(term2)


def cross_entropy_ref(logits, targets, grad_scale=1.0):
    z = logits.astype(np.float64)
    mx = z.max(-1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(-1))
    rows = np.arange(z.shape[0])
    losses = lse - z[rows, targets]
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[rows, targets] = 1.0
    return losses, grad_scale * (p - onehot), p, onehot, mx[:, 0]


def split_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v each (B, H, T, hd), GPT-2 packing."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hd = C // n_head
    parts = [qkv[..., i * C:(i + 1) * C].reshape(B, T, n_head, hd).transpose(0, 2, 1, 3) for i in range(3)]
    return parts


def merge_heads(t):
    """(B, H, T, hd) -> (B, T, H*hd)."""
    B, H, T, hd = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


def attention_forward_ref(qkv, n_head, dtype=np.float64):
    """Returns out (B, T, C), lse (B, H, T) and the probabilities P (B, H, T, T)."""
    q, k, v = (t.astype(dtype) for t in split_heads(qkv, n_head))
    T, hd = q.shape[-2], q.shape[-1]
    s = (q @ np.swapaxes(k, -1, -2)) * dtype(1.0 / np.sqrt(hd))
    s = np.where(np.tril(np.ones((T, T), bool)), s, dtype(-np.inf))
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    lse = mx + np.log(e.sum(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return merge_heads(p @ v), lse[..., 0], p


def attention_backward_ref(qkv, dout, n_head, dtype=np.float64):
    """dL/dqkv for L = sum(dout * out), the standard softmax-attention backward."""
    q, k, v = (t.astype(dtype) for t in split_heads(qkv, n_head))
    hd = q.shape[-1]
    scale = dtype(1.0 / np.sqrt(hd))
    _, _, p = attention_forward_ref(qkv, n_head, dtype)
    B, T, _ = dout.shape
    do = dout.astype(dtype).reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)
    o = p @ v
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (do * o).sum(-1, keepdims=True))
    dq = ds @ k * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def adamw_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """torch.optim.AdamW (single-tensor, non-amsgrad) in float64, with grad *= grad_scale first."""
    p, g, m, v = (t.astype(np.float64) for t in (p, g, m, v))
    g = g * grad_scale
    p = p * (1 - lr * weight_decay)
    m = m + (g - m) * (1 - beta1)          # exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = np.sqrt(v) / np.sqrt(bc2) + eps
    p = p - (lr / bc1) * m / denom
    return p, m, v


# ---- finite-difference checks of the float64 references ---------------------------------------

def test_layernorm_backward_reference_matches_finite_differences():
    x, w, b, dout = rand(3, 7, seed=1, scale=2.0) + 0.5, rand(7, seed=2), rand(7, seed=3), rand(3, 7, seed=4)
    x, w, b, dout = (t.astype(np.float64) for t in (x, w, b, dout))
    dx, dw, db, *_ = layernorm_backward_ref(dout, x, w)
    assert_fd_close(dx, central_difference(lambda xx: (dout * layernorm_ref(xx, w, b)).sum(), x))
    assert_fd_close(dw, central_difference(lambda ww: (dout * layernorm_ref(x, ww, b)).sum(), w))
    assert_fd_close(db, central_difference(lambda bb: (dout * layernorm_ref(x, w, bb)).sum(), b))


def test_gelu_backward_reference_matches_finite_differences():
    x = np.concatenate([np.linspace(-6, 6, 49), [-0.3, 1e-3, 0.7]])
    numeric = (gelu_ref(x + FD_STEP) - gelu_ref(x - FD_STEP)) / (2 * FD_STEP)
    assert_fd_close(gelu_grad_ref(x)[0], numeric)


def test_cross_entropy_reference_matches_finite_differences():
    z = rand(3, 6, seed=5, scale=2.0).astype(np.float64)
    t = np.array([0, 5, 2])
    _, grad, *_ = cross_entropy_ref(z, t, grad_scale=0.5)
    numeric = central_difference(lambda zz: 0.5 * cross_entropy_ref(zz, t)[0].sum(), z)
    assert_fd_close(grad, numeric)


@pytest.mark.parametrize("t,n_head,hd", [(1, 1, 3), (5, 2, 3), (6, 3, 1), (4, 1, 8)])
def test_attention_backward_reference_matches_finite_differences(t, n_head, hd):
    C = n_head * hd
    qkv = rand(2, t, 3 * C, seed=6).astype(np.float64)
    dout = rand(2, t, C, seed=7).astype(np.float64)
    analytic = attention_backward_ref(qkv, dout, n_head)
    numeric = central_difference(lambda a: (dout * attention_forward_ref(a, n_head)[0]).sum(), qkv)
    assert_fd_close(analytic, numeric)
    # lse is log sum exp of the scores: d(sum lse)/d q_i = sum_j p_ij k_j * scale, checked the same way.
    _, k, _ = split_heads(qkv, n_head)
    _, _, p = attention_forward_ref(qkv, n_head)
    dq_lse = merge_heads(p @ k / np.sqrt(hd))
    numeric_lse = central_difference(lambda a: attention_forward_ref(a, n_head)[1].sum(), qkv)
    assert_fd_close(dq_lse, numeric_lse[..., :C])


def test_adamw_reference_matches_torch_formula_by_hand():
    # One step from zero state, worked by hand: m = (1-b1) g, v = (1-b2) g^2, bias corrections make
    # m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps).
    p, g = np.array([1.0, -2.0, 0.5]), np.array([0.5, -4.0, 0.0])
    z = np.zeros(3)
    out, m, v = adamw_ref(p, g, z, z, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1,
                          grad_scale=0.5)
    gs = g * 0.5
    np.testing.assert_allclose(m, 0.1 * gs, rtol=1e-15)
    np.testing.assert_allclose(v, 0.05 * gs * gs, rtol=1e-15)
    np.testing.assert_allclose(out, p * 0.99 - 0.1 * gs / (np.abs(gs) + 1e-8), rtol=1e-12)


# ---- matmul_tn, column_sum ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 33, 300])           # 300 > the 256-deep packed K block
@pytest.mark.parametrize("m", [1, 7, 64, 77, 130])    # 130 > the 120-row packed A block
@pytest.mark.parametrize("n", [1, 33, 77, 600])       # 600 > the 512-column packed B block
def test_matmul_tn(variant, k, m, n):
    a, b = rand(k, m, seed=10), rand(k, n, seed=11)
    out = ops.matmul_tn(a, b)
    assert out.shape == (m, n) and out.dtype == np.float32
    a64 = a.astype(np.float64)
    assert_close(out, a64.T @ b, scale=matmul_scale(a.T, b))


@pytest.mark.parametrize("k,m,n", [(300, 77, 600), (33, 130, 33), (40, 293, 20), (300, 16, 40), (520, 1100, 520)])
def test_matmul_tn_bit_identical_to_matmul_of_the_transpose(variant, k, m, n):
    # A^T's panels are packed a register of rows per k (a whole W-float load while W rows are
    # left in A's row, else only the panel's rows): the sums must be those of the same product
    # over A^T copied out, bit for bit, in the column-split (77, 16 rows) and row-split (130, 293:
    # M > N, M >= 2K; 1100 rows over K and N past its 512-deep, 512-wide blocks) paths, with
    # ragged last panels.
    a, b = rand(k, m, seed=14), rand(k, n, seed=15)
    out = ops.matmul_tn(a, b)
    np.testing.assert_array_equal(out, ops.matmul(np.ascontiguousarray(a.T), b))
    if llamas.info()["cpu_features"] and variant != "generic":
        np.testing.assert_array_equal(out, ops.reference_matmul(np.ascontiguousarray(a.T), b))


def test_matmul_tn_reads_non_contiguous_a_as_a_copy(variant):
    # a transposed view is converted to a C-contiguous array by the binding: the result is still a.T @ b.
    a, b = rand(40, 33, seed=12), rand(33, 20, seed=13)
    out = ops.matmul_tn(a.T, b)
    assert_close(out, a.astype(np.float64) @ b, scale=matmul_scale(a, b))


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("n", [1, 7, 64, 77, 768])
def test_column_sum(variant, rows, n):
    x = rand(rows, n, seed=14, scale=2.0)
    out = ops.column_sum(x)
    assert out.shape == (n,) and out.dtype == np.float32
    assert_close(out, x.astype(np.float64).sum(0), scale=np.abs(x).astype(np.float64).sum(0))


# ---- layernorm_backward ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("c", [1, 7, 64, 77, 768])
def test_layernorm_backward(variant, rows, c):
    x = rand(rows, c, seed=20, scale=3.0) + 1.5
    w, dout = rand(c, seed=21), rand(rows, c, seed=22)
    dx, dw, db = ops.layernorm_backward(dout, x, w, 1e-5)
    assert dx.shape == (rows, c) and dw.shape == (c,) and db.shape == (c,)
    rdx, rdw, rdb, sdx, sdw, sdb = layernorm_backward_ref(dout, x, w)
    assert_close(dx, rdx, scale=sdx, what="dx")
    assert_close(dw, rdw, scale=sdw, what="dw")
    assert_close(db, rdb, scale=sdb, what="db")


def test_layernorm_backward_eps_is_used(variant):
    # A nearly constant row: var ~ 1e-6 is comparable to eps, so a dropped or misplaced eps shows.
    x = (1.0 + rand(4, 33, seed=23, scale=1e-3)).astype(np.float32)
    w, dout = rand(33, seed=24), rand(4, 33, seed=25)
    for eps in (1e-5, 1e-3):
        dx, dw, _ = ops.layernorm_backward(dout, x, w, eps=eps)
        rdx, rdw, _, sdx, sdw, _ = layernorm_backward_ref(dout, x, w, eps=eps)
        assert_close(dx, rdx, scale=sdx, what=f"dx eps={eps}")
        assert_close(dw, rdw, scale=sdw, what=f"dw eps={eps}")


# ---- gelu_backward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64, 77, 768, 20001])
def test_gelu_backward(variant, n):
    x = np.concatenate([rand(n, seed=30, scale=3.0),
                        np.float32([-30.0, -9.0, -3.0, 0.0, 1e-6, 3.0, 9.0, 30.0])])
    dy = rand(x.size, seed=31)
    dx = ops.gelu_backward(x, dy)
    assert dx.shape == x.shape and dx.dtype == np.float32
    grad, scale = gelu_grad_ref(x)
    assert np.all(np.isfinite(dx))
    assert_close(dx, dy * grad, scale=np.abs(dy) * scale)


def test_gelu_backward_keeps_shape(variant):
    x, dy = rand(3, 5, 7, seed=32), rand(3, 5, 7, seed=33)
    dx = ops.gelu_backward(x, dy)
    assert dx.shape == (3, 5, 7)
    grad, scale = gelu_grad_ref(x)
    assert_close(dx, dy * grad, scale=np.abs(dy) * scale)


# ---- cross_entropy -----------------------------------------------------------------------------------

def check_cross_entropy(logits, targets, grad_scale):
    losses, grad = ops.cross_entropy(logits, targets.astype(np.int32), grad_scale)
    rl, rg, p, onehot, mx = cross_entropy_ref(logits, targets, grad_scale)
    assert losses.shape == (logits.shape[0],) and grad.shape == logits.shape
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad))
    z = logits.astype(np.float64)
    # loss = max + log(sum) - z[target]: rounding scales with each of the three terms.
    loss_scale = np.abs(mx) + np.abs(rl + z[np.arange(len(targets)), targets] - mx) + \
        np.abs(z[np.arange(len(targets)), targets])
    assert_close(losses, rl, scale=loss_scale, what="losses")
    assert_close(grad, rg, scale=abs(grad_scale) * (p + onehot), what="dlogits")
    return losses, grad


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("v", [5, 7, 64, 77, 768])
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_cross_entropy(variant, rows, v, grad_scale):
    logits = rand(rows, v, seed=40, scale=3.0)
    targets = np.random.default_rng(41).integers(0, v, rows)
    targets[0] = v - 1  # the last column is a target, past the last full vector
    check_cross_entropy(logits, targets, grad_scale)


@pytest.mark.parametrize("name", ["cross_entropy", "reference_cross_entropy"])
def test_cross_entropy_ignores_minus_100_rows(variant, name):
    fn = getattr(ops, name)
    z = rand(5, 37, seed=43)
    t = np.array([3, -100, 36, -100, 0], dtype=np.int32)
    losses, grads = fn(z, t, 0.5)
    assert losses[1] == losses[3] == 0 and not grads[[1, 3]].any()
    kept, kept_grads = fn(z[[0, 2, 4]], t[[0, 2, 4]], 0.5)
    np.testing.assert_array_equal(losses[[0, 2, 4]], kept)
    np.testing.assert_array_equal(grads[[0, 2, 4]], kept_grads)
    with pytest.raises(llamas.LlamasError, match="not -100"):
        fn(z, np.array([3, -1, 0, 0, 0], dtype=np.int32), 0.5)


def test_cross_entropy_gpt2_vocabulary(variant):
    logits = rand(2, 50257, seed=42, scale=2.0)
    check_cross_entropy(logits, np.array([50256, 17]), 1.0 / 8)


def test_cross_entropy_extreme_logits_stay_finite(variant):
    v = 77
    logits = np.zeros((6, v), np.float32)
    logits[0, ::2], logits[0, 1::2] = 80.0, -80.0   # alternating +-80, target at -80
    logits[1, :] = -80.0                             # all -80
    logits[2, :] = 80.0                              # all +80
    logits[3, :] = rand(v, seed=43)
    logits[3, 40] = 1e30                             # one huge logit, target elsewhere
    logits[4, :] = rand(v, seed=44)
    logits[4, 76] = 1e30                             # one huge logit in the tail lanes, as target
    logits[5, :] = 80.0
    logits[5, 3] = -80.0                             # target is the only -80
    targets = np.array([1, 5, 70, 0, 76, 3])
    losses, _ = check_cross_entropy(logits, targets, 1.0)
    assert losses[0] == pytest.approx(160 + np.log(39), rel=1e-6)
    assert losses[3] == pytest.approx(1e30, rel=1e-6)
    assert losses[4] == 0.0
    assert losses[5] == pytest.approx(160 + np.log(76), rel=1e-6)  # 76 logits at +80


def test_cross_entropy_grad_scale_zero_computes_losses_only(variant):
    # With grad_scale 0 the kernel skips the gradient; the binding's second output is then not a
    # gradient (it is its untouched copy of the logits), so only the losses are checked.
    logits = rand(5, 77, seed=45, scale=3.0)
    targets = np.array([0, 76, 3, 40, 7], np.int32)
    losses0, _ = ops.cross_entropy(logits, targets, 0.0)
    losses1, _ = ops.cross_entropy(logits, targets, 1.0)
    rl, *_ = cross_entropy_ref(logits, targets)
    assert_close(losses0, rl, scale=np.abs(rl) + np.abs(logits).max(-1))
    np.testing.assert_array_equal(losses0, losses1)


def test_cross_entropy_does_not_modify_its_input(variant):
    logits = rand(3, 9, seed=46)
    before = logits.copy()
    ops.cross_entropy(logits, np.array([0, 1, 2], np.int32), 1.0)
    np.testing.assert_array_equal(logits, before)


# ---- attention forward / backward -------------------------------------------------------------------

def attention_inputs(b, t, n_head, hd, seed):
    qkv = rand(b, t, 3 * n_head * hd, seed=seed)
    dout = rand(b, t, n_head * hd, seed=seed + 1)
    return qkv, dout


def assert_within_twice_naive(actual, exact, naive, what):
    """The attention rule of tolerances.py / test_kernels.py: error against float64 at most twice
    that of a straightforward float32 computation (plus 1e-6 for exact-zero naive errors)."""
    err = np.abs(actual.astype(np.float64) - exact).max()
    naive_err = np.abs(naive.astype(np.float64) - exact).max()
    assert err <= 2 * naive_err + 1e-6, f"{what}: err {err:.3g} vs naive float32 {naive_err:.3g}"


@pytest.mark.parametrize("t", [1, 5, 17, 64])
@pytest.mark.parametrize("hd", [1, 8, 24, 64])
def test_attention_forward(variant, t, hd):
    b, n_head = 2, 3
    qkv, _ = attention_inputs(b, t, n_head, hd, seed=50)
    out, lse = ops.attention_forward(qkv, n_head)
    assert out.shape == (b, t, n_head * hd) and lse.shape == (b, n_head, t)
    ref_out, ref_lse, _ = attention_forward_ref(qkv, n_head)
    naive_out, naive_lse, _ = attention_forward_ref(qkv, n_head, np.float32)
    assert_within_twice_naive(out, ref_out, naive_out, "out")
    assert_within_twice_naive(lse, ref_lse, naive_lse, "lse")
    # Elementwise too: lse = max score + log(sum) rounds with the dot products |q| . |k| / sqrt(hd).
    q, k, _ = split_heads(qkv, n_head)
    abs_scores = np.abs(q).astype(np.float64) @ np.abs(np.swapaxes(k, -1, -2)) / np.sqrt(hd)
    assert_close(lse, ref_lse, scale=np.abs(ref_lse) + np.tril(abs_scores).max(-1), what="lse")


@pytest.mark.parametrize("t", [1, 5, 17, 64])
@pytest.mark.parametrize("hd", [1, 8, 24, 64])
def test_attention_backward(variant, t, hd):
    b, n_head = 2, 3
    qkv, dout = attention_inputs(b, t, n_head, hd, seed=52)
    out, lse = ops.attention_forward(qkv, n_head)
    dqkv = ops.attention_backward(qkv, out, lse, dout, n_head)
    assert dqkv.shape == qkv.shape and dqkv.dtype == np.float32
    exact = attention_backward_ref(qkv, dout, n_head)
    naive = attention_backward_ref(qkv, dout, n_head, np.float32)
    C = n_head * hd
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(i * C, (i + 1) * C)
        assert_within_twice_naive(dqkv[..., sl], exact[..., sl], naive[..., sl], name)


def test_attention_single_head_and_wide_heads(variant):
    # n_head = 1 (one head spans all of C) and n_head = C (hd = 1) on the same qkv width.
    qkv, dout = attention_inputs(1, 9, 1, 12, seed=54)
    for n_head in (1, 12, 4):
        out, lse = ops.attention_forward(qkv, n_head)
        dqkv = ops.attention_backward(qkv, out, lse, dout, n_head)
        ref_out, _, _ = attention_forward_ref(qkv, n_head)
        assert_within_twice_naive(out, ref_out, attention_forward_ref(qkv, n_head, np.float32)[0], "out")
        assert_within_twice_naive(dqkv, attention_backward_ref(qkv, dout, n_head),
                                  attention_backward_ref(qkv, dout, n_head, np.float32), "dqkv")


def test_attention_first_row_and_lse_closed_form(variant):
    # Row 0 sees only itself: out = v_0, lse = q_0 . k_0 / sqrt(hd); dq_0 = dk_0 = 0 for row 0 alone
    # (up to rounding: dP = dO . v comes from a GEMM chain, rowdot(dO, O) from a vector dot, so
    # their difference is a few ulps of |dO| |v|, not exactly 0).
    qkv, dout = attention_inputs(1, 1, 2, 8, seed=56)
    out, lse = ops.attention_forward(qkv, 2)
    q, k, v = split_heads(qkv, 2)
    np.testing.assert_array_equal(out, merge_heads(v))
    assert_close(lse, (q.astype(np.float64) * k).sum(-1) / np.sqrt(8), scale=np.abs(q * k).sum(-1) / np.sqrt(8))
    dqkv = ops.attention_backward(qkv, out, lse, dout, 2)
    ulps = 8 * np.finfo(np.float32).eps * np.abs(dout).max() * np.abs(v).max() * 8 * np.abs(q).max()
    np.testing.assert_allclose(dqkv[..., :32], 0.0, atol=ulps)
    assert_close(dqkv[..., 32:], dout)


# ---- embedding_backward -----------------------------------------------------------------------------

def embedding_backward_ref(ids, positions, dx, V, P):
    dx = dx.astype(np.float64)
    dwte, dwpe = np.zeros((V, dx.shape[1])), np.zeros((P, dx.shape[1]))
    np.add.at(dwte, ids, dx)
    np.add.at(dwpe, positions, dx)
    swte, swpe = np.zeros_like(dwte), np.zeros_like(dwpe)
    np.add.at(swte, ids, np.abs(dx))
    np.add.at(swpe, positions, np.abs(dx))
    return dwte, dwpe, swte, swpe


@pytest.mark.parametrize("c", [1, 7, 64, 77, 768])
@pytest.mark.parametrize("n", [1, 3, 33])
def test_embedding_backward(variant, c, n):
    V, P = 50, 17
    rng = np.random.default_rng(60)
    ids = rng.integers(0, V, n).astype(np.int32)
    positions = (np.arange(n) % P).astype(np.int64)
    dx = rand(n, c, seed=61)
    dwte, dwpe = ops.embedding_backward(ids, positions, dx, V, P)
    assert dwte.shape == (V, c) and dwpe.shape == (P, c)
    rte, rpe, ste, spe = embedding_backward_ref(ids, positions, dx, V, P)
    assert_close(dwte, rte, scale=ste, what="dwte")
    assert_close(dwpe, rpe, scale=spe, what="dwpe")


def test_embedding_backward_repeated_ids_sum(variant):
    V, P, c = 10, 8, 77
    ids = np.array([3] * 40 + [0, 9, 3, 0], np.int32)  # id 3 forty-one times, 0 twice
    positions = np.array([5] * 20 + list(range(8)) * 3, np.int64)[:ids.size]
    dx = rand(ids.size, c, seed=62)
    dwte, dwpe = ops.embedding_backward(ids, positions, dx, V, P)
    rte, rpe, ste, spe = embedding_backward_ref(ids, positions, dx, V, P)
    assert_close(dwte, rte, scale=ste, what="dwte")
    assert_close(dwpe, rpe, scale=spe, what="dwpe")
    untouched = [i for i in range(V) if i not in set(ids.tolist())]
    np.testing.assert_array_equal(dwte[untouched], 0.0)
    # Exact on integer-valued rows: summing small integers in float32 has no rounding.
    ones = np.ones((ids.size, c), np.float32)
    dwte, dwpe = ops.embedding_backward(ids, positions, ones, V, P)
    np.testing.assert_array_equal(dwte[3], 41.0)
    np.testing.assert_array_equal(dwte[0], 2.0)
    np.testing.assert_array_equal(dwpe[5], float((positions == 5).sum()))


# ---- adamw --------------------------------------------------------------------------------------------

LR = 0.05  # large enough that an error in the update itself shows above float32 rounding of p


@pytest.mark.parametrize("n", [7, 10007])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_scale", [1.0, 0.3])
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.8, 0.999)])
@pytest.mark.parametrize("grad_magnitude", [1.0, 1e-8])  # 1e-8: |g| ~ eps, so eps placement shows
def test_adamw(variant, n, weight_decay, grad_scale, steps, betas, grad_magnitude):
    beta1, beta2 = betas
    eps = 1e-8
    p = rand(n, seed=70)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    m_abs = np.zeros(n)  # running sum of |terms| of m, its error scale (m may cancel towards 0)
    for step in range(1, steps + 1):
        g = rand(n, seed=100 + step) * np.float32(grad_magnitude)
        p, m, v = ops.adamw(p, g, m, v, LR, beta1, beta2, eps, weight_decay, step, grad_scale)
        rp, rm, rv = adamw_ref(rp, g, rm, rv, LR, beta1, beta2, eps, weight_decay, step, grad_scale)
        m_abs = beta1 * m_abs + (1 - beta1) * np.abs(g * grad_scale)
    assert p.dtype == np.float32 and p.shape == (n,)
    gm = grad_magnitude * grad_scale
    # m, v compared in units of the gradient size, so tiny gradients are checked as tightly.
    assert_close(m / gm, rm / gm, scale=m_abs / gm, what="exp_avg")
    assert_close(v / gm ** 2, rv / gm ** 2, what="exp_avg_sq")
    # Each step moves p by at most ~lr (|m_hat| / sqrt(v_hat) <= 1 here), so rounding scales with |p| + lr.
    assert_close(p, rp, scale=np.abs(rp) + LR * steps, what="param")


def test_adamw_zero_gradient_only_decays(variant):
    p = rand(33, seed=80)
    z = np.zeros(33, np.float32)
    p2, m2, v2 = ops.adamw(p, z, z, z, 0.01, 0.9, 0.95, 1e-8, 0.1, 1, 1.0)
    np.testing.assert_array_equal(m2, 0.0)
    np.testing.assert_array_equal(v2, 0.0)
    assert_close(p2, p.astype(np.float64) * (1 - 0.01 * 0.1))


def test_adamw_does_not_modify_inputs(variant):
    p, g, m, v = rand(20, seed=81), rand(20, seed=82), rand(20, seed=83), np.abs(rand(20, seed=84))
    copies = [t.copy() for t in (p, g, m, v)]
    ops.adamw(p, g, m, v, 0.01, 0.9, 0.95, 1e-8, 0.1, 3, 0.5)
    for before, after in zip(copies, (p, g, m, v)):
        np.testing.assert_array_equal(before, after)


# ---- determinism ---------------------------------------------------------------------------------------

def _det_cases():
    """name -> a call of one kernel on inputs large enough to be split across threads."""
    a, b = rand(300, 70, seed=90), rand(300, 200, seed=91)
    x, w, dout = rand(33, 768, seed=92) + 1.0, rand(768, seed=93), rand(33, 768, seed=94)
    g = rand(50000, seed=95, scale=3.0)
    logits = rand(33, 1000, seed=96, scale=3.0)
    targets = np.random.default_rng(97).integers(0, 1000, 33).astype(np.int32)
    qkv, adout = attention_inputs(2, 40, 3, 24, seed=98)
    ids = np.random.default_rng(99).integers(0, 30, 200).astype(np.int32)
    pos = (np.arange(200) % 64).astype(np.int64)
    edx = rand(200, 768, seed=100)
    p, m, v = rand(50000, seed=101), rand(50000, seed=102), np.abs(rand(50000, seed=103))

    def attn():
        out, lse = ops.attention_forward(qkv, 3)
        return out, lse, ops.attention_backward(qkv, out, lse, adout, 3)

    return {
        "matmul_tn": lambda: (ops.matmul_tn(a, b),),
        "column_sum": lambda: (ops.column_sum(dout),),
        "layernorm_backward": lambda: ops.layernorm_backward(dout, x, w, 1e-5),
        "gelu_backward": lambda: (ops.gelu_backward(g, g[::-1].copy()),),
        "cross_entropy": lambda: ops.cross_entropy(logits, targets, 0.5),
        "attention": attn,
        "embedding_backward": lambda: ops.embedding_backward(ids, pos, edx, 30, 64),
        "adamw": lambda: ops.adamw(p, g, m, v, 0.01, 0.9, 0.95, 1e-8, 0.1, 7, 0.7),
    }


DET_CASES = list(_det_cases())


@pytest.mark.parametrize("name", DET_CASES)
def test_deterministic_run_to_run_and_across_thread_counts(variant, name):
    fn = _det_cases()[name]
    first = fn()
    second = fn()
    one = with_threads(1, fn)
    two = with_threads(2, fn)
    for a, b, c, d in zip(first, second, one, two):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: run to run")
        np.testing.assert_array_equal(c, d, err_msg=f"{name}: 1 vs 2 threads")
        np.testing.assert_array_equal(a, d, err_msg=f"{name}: default vs 2 threads")


# ---- bad input ------------------------------------------------------------------------------------------

def test_cross_entropy_rejects_out_of_range_targets():
    logits = rand(3, 5, seed=110)
    with pytest.raises(llamas.LlamasError, match=r"\[cross_entropy\].*target 7 at row 1"):
        ops.cross_entropy(logits, np.array([0, 7, 1], np.int32))
    with pytest.raises(llamas.LlamasError, match=r"\[cross_entropy\].*target 5 at row 2"):
        ops.cross_entropy(logits, np.array([0, 4, 5], np.int32))
    with pytest.raises(llamas.LlamasError, match=r"\[cross_entropy\].*target -1 at row 0"):
        ops.cross_entropy(logits, np.array([-1, 0, 0], np.int32))
    with pytest.raises(llamas.LlamasError, match=r"\[cross_entropy\]"):
        ops.cross_entropy(logits, np.array([0, 1], np.int32))


def test_attention_rejects_too_long_sequences():
    T = 4097
    qkv = np.zeros((1, T, 6), np.float32)
    with pytest.raises(llamas.LlamasError, match=r"\[attention\].*4097.*4096"):
        ops.attention_forward(qkv, 1)
    out, lse, dout = np.zeros((1, T, 2), np.float32), np.zeros((1, 1, T), np.float32), np.zeros((1, T, 2), np.float32)
    with pytest.raises(llamas.LlamasError, match=r"\[attention_backward\].*4097.*4096"):
        ops.attention_backward(qkv, out, lse, dout, 1)


def test_attention_rejects_bad_shapes():
    with pytest.raises(llamas.LlamasError, match=r"\[attention_forward\]"):
        ops.attention_forward(rand(1, 4, 10), 2)  # 10 is not 3 * C with C divisible by 2
    qkv = rand(1, 4, 12)
    with pytest.raises(llamas.LlamasError, match=r"\[attention_backward\]"):
        ops.attention_backward(qkv, rand(1, 4, 4), rand(1, 2, 4), rand(1, 4, 3), 2)


def test_embedding_backward_rejects_out_of_range_ids():
    dx = rand(2, 4, seed=111)
    with pytest.raises(llamas.LlamasError, match=r"\[embedding_backward\].*at 1"):
        ops.embedding_backward(np.array([0, 10], np.int32), np.array([0, 1], np.int64), dx, 10, 4)
    with pytest.raises(llamas.LlamasError, match=r"\[embedding_backward\].*at 0"):
        ops.embedding_backward(np.array([0, 1], np.int32), np.array([4, 1], np.int64), dx, 10, 4)


def test_other_kernels_reject_bad_shapes():
    with pytest.raises(llamas.LlamasError, match=r"\[matmul_tn\]"):
        ops.matmul_tn(rand(3, 4), rand(5, 6))
    with pytest.raises(llamas.LlamasError, match=r"\[layernorm_backward\]"):
        ops.layernorm_backward(rand(3, 4), rand(3, 4), rand(5))
    with pytest.raises(llamas.LlamasError, match=r"\[gelu_backward\]"):
        ops.gelu_backward(rand(3), rand(4))
    with pytest.raises(llamas.LlamasError, match=r"\[adamw\]"):
        ops.adamw(rand(3), rand(3), rand(3), rand(3), 0.1, 0.9, 0.95, 1e-8, 0.0, 0, 1.0)


# ---- the fast kernels against the plain C++ references (cpu/reference_train.cpp) ---------------

@pytest.mark.parametrize("rows,C", [(1, 1), (3, 77), (33, 768)])
def test_layernorm_backward_matches_cpp_reference(variant, rows, C):
    rng = np.random.default_rng(rows * 1000 + C)
    dout, x, w = (rng.standard_normal(s).astype(np.float32) for s in ((rows, C), (rows, C), (C,)))
    for got, want in zip(ops.layernorm_backward(dout, x, w), ops.reference_layernorm_backward(dout, x, w)):
        assert_close(got, want, scale=np.abs(want).max() + 1.0)


def test_gelu_backward_matches_cpp_reference(variant):
    x = np.linspace(-12, 12, 10007).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(x.size).astype(np.float32)
    assert_close(ops.gelu_backward(x, dy), ops.reference_gelu_backward(x, dy), scale=np.abs(dy) * 1.2)


@pytest.mark.parametrize("rows,V", [(1, 5), (7, 77), (3, 4099)])
def test_cross_entropy_matches_cpp_reference(variant, rows, V):
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((rows, V)) * 4).astype(np.float32)
    targets = rng.integers(0, V, rows).astype(np.int32)
    got, want = ops.cross_entropy(logits, targets, 0.5), ops.reference_cross_entropy(logits, targets, 0.5)
    assert_close(got[0], want[0], scale=np.abs(logits).max())
    assert_close(got[1], want[1], scale=0.5)


@pytest.mark.parametrize("B,T,H,hd", [(1, 1, 1, 1), (2, 17, 3, 24), (1, 70, 2, 64)])
def test_attention_backward_matches_cpp_reference(variant, B, T, H, hd):
    rng = np.random.default_rng(T * hd)
    qkv = rng.standard_normal((B, T, 3 * H * hd)).astype(np.float32)
    dout = rng.standard_normal((B, T, H * hd)).astype(np.float32)
    out, lse = ops.attention_forward(qkv, H)
    got = ops.attention_backward(qkv, out, lse, dout, H)
    want = ops.reference_attention_backward(qkv, dout, H)
    assert_close(got, want, scale=np.sqrt(hd) * np.abs(dout).max() * np.abs(qkv).max() ** 2 * 4)


def test_adamw_matches_cpp_reference(variant):
    rng = np.random.default_rng(3)
    p, g, m = (rng.standard_normal(1001).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(1001)).astype(np.float32)
    args = (1e-3, 0.9, 0.95, 1e-8, 0.1, 7, 0.5)
    for got, want in zip(ops.adamw(p, g, m, v, *args), ops.reference_adamw(p, g, m, v, *args)):
        assert_close(got, want, scale=np.abs(want).max())
