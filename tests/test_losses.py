"""Tests of losses.py against float64 references written from the paper's equations
(Eqs. 4, 6, 7, 9) with the index convention of docs/method.md §Index convention: z_t predicts position t+1."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fused_losses
import losses

B, T, C, D = 4, 12, 11, 8


def make_batch(seed=0, dtype=torch.float32):
    """Random logits, labels and image blocks. Sample 0: BOS then an image then text;
    sample 1: text only; sample 2: image from t = 0; sample 3: image at the very end."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    image_mask[0, 1:5] = True
    image_mask[2, 0:3] = True
    image_mask[3, T - 3:] = True
    labels[image_mask] = -100
    labels[:, 0] = -100  # BOS
    logits = (3 * torch.randn(B, T, C, generator=g)).to(dtype).requires_grad_()
    visual_logits = (3 * torch.randn(int(image_mask.sum()), C, generator=g)).to(dtype).requires_grad_()
    return logits, labels, visual_logits, image_mask


# -----------------------------------------------------------------------------
# independent references: plain Python loops and math, in float64

def log_softmax_list(z):
    z = z.detach().double().tolist()
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def kl_list(log_p, log_q):
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def ref_lm(logits, labels):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            total += -log_softmax_list(logits[b, t])[y]  # -log Q_t(label[t+1])
            n += 1
    return total / max(n, 1)


def ref_vm_terms(logits, visual_logits, image_mask, fit=False):
    """{(b, t): KL term} for every t whose position t+1 is an image position."""
    terms, k = {}, 0
    for b in range(image_mask.shape[0]):
        for s in range(image_mask.shape[1]):
            if not image_mask[b, s]:
                continue
            if s > 0:  # the row of an image at s = 0 has nobody predicting it
                log_p = log_softmax_list(visual_logits[k])  # P'_s
                log_q = log_softmax_list(logits[b, s - 1])  # Q_{s-1}
                terms[(b, s - 1)] = kl_list(log_q, log_p) if fit else kl_list(log_p, log_q)
            k += 1
    return terms


def ref_vm(logits, visual_logits, image_mask, fit=False):
    terms = ref_vm_terms(logits, visual_logits, image_mask, fit)
    return sum(terms.values()) / max(len(terms), 1)


def close(a, b, rel=1e-6):
    return abs(a.item() - b) <= rel * max(abs(b), 1e-12)


# -----------------------------------------------------------------------------
# values

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_float64_reference(seed):
    logits, labels, visual, image_mask = make_batch(seed)
    lm = losses.lm_loss(logits, labels)
    vm = losses.vm_loss(logits, visual, image_mask)
    fit = losses.vm_fit_loss(logits, visual, image_mask)
    total, lm2, vm2 = losses.mm_loss(logits, labels, visual, image_mask)
    assert close(lm, ref_lm(logits, labels))
    assert close(vm, ref_vm(logits, visual, image_mask))
    assert close(fit, ref_vm(logits, visual, image_mask, fit=True))
    assert close(total, ref_lm(logits, labels) + ref_vm(logits, visual, image_mask))
    assert lm2.item() == lm.item() and vm2.item() == vm.item()
    for x in (lm, vm, fit, total):
        assert x.dtype == torch.float32 and x.dim() == 0


def test_bf16_logits_give_float32_loss():
    logits, labels, visual, image_mask = make_batch(3, dtype=torch.bfloat16)
    lm = losses.lm_loss(logits, labels)
    vm = losses.vm_loss(logits, visual, image_mask)
    assert lm.dtype == vm.dtype == torch.float32
    # the bf16 inputs are exact in float32, so only float32 round-off is left
    assert close(lm, ref_lm(logits, labels), rel=1e-5)
    assert close(vm, ref_vm(logits, visual, image_mask), rel=1e-5)
    lm.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_count_positions():
    _, labels, _, image_mask = make_batch(0)
    n_lm, n_vm = losses.count_positions(labels, image_mask)
    assert int(n_lm) == int((labels[:, 1:] != -100).sum())
    assert int(n_vm) == 4 + 2 + 3  # sample 2's image at t = 0 has no predicting position
    assert int(losses.count_positions(None, image_mask)[0]) == 0


def test_visual_rows_must_match_image_mask():
    logits, _, visual, image_mask = make_batch(0)
    with pytest.raises(ValueError):
        losses.vm_loss(logits, visual[:-1], image_mask)


# -----------------------------------------------------------------------------
# gradients: who trains what, and where

def test_eq6_trains_mm_side_only():
    logits, _, _, image_mask = make_batch(0)
    vm_head = torch.nn.Linear(D, C, bias=False)
    x_image = torch.randn(int(image_mask.sum()), D)
    losses.vm_loss(logits, vm_head(x_image), image_mask).backward()
    assert vm_head.weight.grad is None or vm_head.weight.grad.abs().max() == 0
    assert logits.grad.abs().max() > 0


def test_eq9_trains_vm_head_only():
    _, _, _, image_mask = make_batch(0)
    mm_head = torch.nn.Linear(D, C, bias=False)
    vm_head = torch.nn.Linear(D, C, bias=False)
    hidden = torch.randn(B, T, D, requires_grad=True)
    x_image = torch.randn(int(image_mask.sum()), D)
    losses.vm_fit_loss(mm_head(hidden), vm_head(x_image), image_mask).backward()
    for p in (mm_head.weight, hidden):
        assert p.grad is None or p.grad.abs().max() == 0
    assert vm_head.weight.grad.abs().max() > 0


def test_gradient_support_follows_the_index_convention():
    logits, labels, visual, image_mask = make_batch(1)
    predicts_image = torch.zeros(B, T, dtype=torch.bool)
    predicts_image[:, :-1] = image_mask[:, 1:]  # row t is used iff position t+1 is an image
    predicts_label = torch.zeros(B, T, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != -100
    for loss, used in ((losses.vm_loss(logits, visual, image_mask), predicts_image),
                       (losses.lm_loss(logits, labels), predicts_label)):
        (grad,) = torch.autograd.grad(loss, logits)
        nonzero = grad.abs().amax(-1) > 0
        assert torch.equal(nonzero, used)


def test_moving_one_visual_position_changes_one_term():
    logits, _, visual, image_mask = make_batch(2)
    positions = image_mask.nonzero().tolist()  # row-major, the rows of visual
    k = positions.index([0, 3])  # image position p = 3 of sample 0
    moved = visual.detach().clone()
    moved[k] += torch.randn(C)
    before = ref_vm_terms(logits, visual, image_mask)
    after = ref_vm_terms(logits, moved, image_mask)
    changed = [key for key in before if before[key] != after[key]]
    assert changed == [(0, 2)]  # only the term of t = p - 1
    n = len(before)
    delta = losses.vm_loss(logits, moved, image_mask) - losses.vm_loss(logits, visual, image_mask)
    assert abs(delta.item() - (after[(0, 2)] - before[(0, 2)]) / n) < 1e-5
    # the gradient w.r.t. the logits changes only in row (0, 2)
    (g0,) = torch.autograd.grad(losses.vm_loss(logits, visual, image_mask), logits)
    (g1,) = torch.autograd.grad(losses.vm_loss(logits, moved, image_mask), logits)
    diff = (g1 - g0).abs().amax(-1) > 0
    assert diff.nonzero().tolist() == [[0, 2]]
    # an image at t = 0 is predicted by nobody: its row is ignored
    k0 = positions.index([2, 0])
    moved0 = visual.detach().clone()
    moved0[k0] += 100.0
    assert losses.vm_loss(logits, moved0, image_mask).item() == losses.vm_loss(logits, visual, image_mask).item()


# -----------------------------------------------------------------------------
# normalisation by the count of the whole optimizer step

def split(logits, labels, visual, image_mask, rows):
    """The micro-batch of the given samples (visual rows follow the row-major order)."""
    sample_of_row = image_mask.nonzero()[:, 0]
    keep = torch.isin(sample_of_row, torch.tensor(rows))
    return logits[rows], labels[rows], visual[keep], image_mask[rows]


def test_external_counts_make_micro_batches_add_up():
    logits, labels, visual, image_mask = make_batch(4)
    n_lm, n_vm = losses.count_positions(labels, image_mask)
    whole = losses.mm_loss(logits, labels, visual, image_mask)
    whole_fit = losses.vm_fit_loss(logits, visual, image_mask)
    parts, parts_fit = [torch.zeros(())] * 3, torch.zeros(())
    for rows in ([0, 1], [2, 3]):
        mb = split(logits, labels, visual, image_mask, rows)
        out = losses.mm_loss(*mb, lm_count=n_lm, vm_count=n_vm)
        parts = [p + o for p, o in zip(parts, out)]
        parts_fit = parts_fit + losses.vm_fit_loss(mb[0], mb[2], mb[3], num_positions=int(n_vm))
    for a, b in zip(parts, whole):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert torch.allclose(parts_fit, whole_fit, rtol=1e-6, atol=0)
    (g_parts,) = torch.autograd.grad(parts[0], logits)
    (g_whole,) = torch.autograd.grad(whole[0], logits)
    assert torch.allclose(g_parts, g_whole, rtol=1e-5, atol=1e-8)


def test_zero_count_gives_attached_zero():
    logits, labels, visual, image_mask = make_batch(0)
    labels[:] = -100
    empty = torch.zeros_like(image_mask)
    no_visual = visual[:0]
    for loss in (losses.lm_loss(logits, labels), losses.lm_loss(logits, labels, num_positions=0),
                 losses.vm_loss(logits, no_visual, empty), losses.vm_fit_loss(logits, no_visual, empty, 0),
                 losses.mm_loss(logits, labels, no_visual, empty, 0, 0)[0]):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


# -----------------------------------------------------------------------------
# chunked_mm_loss: same numbers as the naive path, without the full logits

def make_hidden_batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    _, labels, _, image_mask = make_batch(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    w_mm = (torch.randn(C, D, generator=g) / 2).to(dtype)
    x_image = torch.randn(int(image_mask.sum()), D, generator=g).to(dtype)
    w_vm = (torch.randn(C, D, generator=g) / 2).to(dtype)
    return hidden, w_mm, labels, image_mask, x_image, w_vm


def naive(hidden, w_mm, labels, image_mask, x_image, w_vm, lm_count=None, vm_count=None):
    logits = hidden @ w_mm.T
    lm = losses.lm_loss(logits, labels, lm_count) if labels is not None else torch.zeros(())
    vm = losses.vm_loss(logits, x_image @ w_vm.T, image_mask, vm_count) if image_mask is not None else torch.zeros(())
    return lm, vm


@pytest.mark.parametrize("dtype,head", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                        (torch.bfloat16, None)])
@pytest.mark.parametrize("terms", ["lm", "vm", "both"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_matches_naive(chunk_size, terms, dtype, head):
    """head: the matmuls' dtype (None: the policy, bf16 for bf16 inputs). Softmax and sums are float32."""
    hidden, w_mm, labels, image_mask, x_image, w_vm = make_hidden_batch(5, dtype)
    if terms == "vm":
        labels = None
    if terms == "lm":
        image_mask = None
    # reference: float32 naive path on the very same (possibly bf16-rounded) values
    h32 = hidden.float().requires_grad_()
    w32 = w_mm.float().requires_grad_()
    ref = naive(h32, w32, labels, image_mask, x_image.float(), w_vm.float())
    ref_grads = torch.autograd.grad(sum(ref), (h32, w32))

    hidden.requires_grad_()
    w_mm.requires_grad_()
    x_image.requires_grad_()
    w_vm.requires_grad_()
    out = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm, chunk_size=chunk_size,
                                 dtype=head)
    grads = torch.autograd.grad(sum(out), (hidden, w_mm, x_image, w_vm), allow_unused=True)
    assert grads[2] is None and grads[3] is None  # the VM target carries no gradient
    assert grads[0].dtype == grads[1].dtype == dtype
    for o in out:
        assert o.dtype == torch.float32
    if dtype == torch.float32 or head == torch.float32:
        # float32 matmuls: the forward is float32 in both paths; only the returned grads are rounded
        # to dtype (per term, so with both terms the error is a bf16 ulp of each term's gradient)
        for o, r in zip(out, ref):
            assert torch.allclose(o, r, rtol=1e-5, atol=1e-6)
    else:
        # bf16 matmuls (float32 accumulation, one rounding of each logit to bf16): the stated tolerance
        # is 1% of each loss and 3% of the gradient's largest entry
        for o, r in zip(out, ref):
            assert (o - r).abs() <= 1e-2 * r.abs() + 1e-6
    for g, r in zip(grads[:2], ref_grads):
        if dtype == torch.float32:
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
        elif head == torch.float32:
            assert (g.float() - r).abs().max() <= 1e-2 * r.abs().max()
        else:
            assert (g.float() - r).abs().max() <= 3e-2 * r.abs().max()
    if terms != "vm":
        assert out[0].item() > 0
    if terms != "lm":
        assert out[1].item() > 0


def test_bf16_policy_follows_autocast_and_the_inputs():
    h32, w32 = torch.randn(1, 2, 4), torch.randn(5, 4)
    assert fused_losses.head_dtype(h32, w32) == torch.float32
    assert fused_losses.head_dtype(h32.bfloat16(), w32.bfloat16()) == torch.bfloat16  # FSDP's bf16 param_dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_losses.head_dtype(h32, w32) == torch.bfloat16  # the decoder's autocast policy


def test_chunked_external_counts_and_empty_batch():
    hidden, w_mm, labels, image_mask, x_image, w_vm = make_hidden_batch(6, torch.float32)
    hidden.requires_grad_()
    out = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm, lm_count=100, vm_count=50, chunk_size=4)
    ref = naive(hidden, w_mm, labels, image_mask, x_image, w_vm, lm_count=100, vm_count=50)
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, rtol=1e-5)
    with torch.no_grad():  # evaluation: the loss only, same numbers
        out = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm, lm_count=100, vm_count=50, chunk_size=4)
    for o, r in zip(out, ref):
        assert torch.allclose(o, r, rtol=1e-5) and o.grad_fn is None
    labels = torch.full_like(labels, -100)
    empty = torch.zeros_like(image_mask)
    lm, vm = losses.chunked_mm_loss(hidden, w_mm, labels, empty, x_image[:0], w_vm, lm_count=0, vm_count=0)
    assert lm.item() == 0.0 and vm.item() == 0.0
    (lm + vm).backward()
    assert hidden.grad.abs().max() == 0


class PeakNumel(TorchDispatchMode):
    """Records the largest tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


def test_chunked_never_materialises_all_logits():
    b, t, c, d, chunk = 2, 40, 64, 8, 4
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, c, (b, t), generator=g)
    image_mask = torch.zeros(b, t, dtype=torch.bool)
    image_mask[:, 1:30] = True
    labels[image_mask] = -100
    labels[:, 0] = -100
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    w_mm = torch.randn(c, d, generator=g, requires_grad=True)
    x_image = torch.randn(int(image_mask.sum()), d, generator=g)
    w_vm = torch.randn(c, d, generator=g)
    n_lm, n_vm = (int(n) for n in losses.count_positions(labels, image_mask))
    smallest_full_logits = min(n_lm, n_vm) * c  # 20 * 64 floats

    with PeakNumel() as mode:
        lm, vm = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm, chunk_size=chunk)
        (lm + vm).backward()
    assert mode.peak <= max(chunk * c, c * d, b * t * d)
    assert mode.peak < smallest_full_logits

    with PeakNumel() as mode:  # the detector does see the naive path's logits
        sum(naive(hidden, w_mm, labels, image_mask, x_image, w_vm)).backward()
    assert mode.peak >= b * t * c


def test_chunked_terms_weighted_differently():
    """One (C, d) gradient buffer serves both terms; backward of 2 lm + 0.5 vm, or of lm alone,
    still gives the exact gradients (by redoing the chunks), and a second backward is refused."""
    hidden, w_mm, labels, image_mask, x_image, w_vm = make_hidden_batch(8, torch.float32)
    for a, b in [(2.0, 0.5), (1.0, 0.0), (0.0, 1.0)]:
        h = hidden.clone().requires_grad_()
        w = w_mm.clone().requires_grad_()
        ref = naive(h, w, labels, image_mask, x_image, w_vm)
        ref_grads = torch.autograd.grad(a * ref[0] + b * ref[1], (h, w))
        lm, vm = losses.chunked_mm_loss(h, w, labels, image_mask, x_image, w_vm, chunk_size=5)
        grads = torch.autograd.grad(a * lm + b * vm, (h, w))
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
    lm, vm = losses.chunked_mm_loss(h, w, labels, image_mask, x_image, w_vm, chunk_size=5)
    (lm + vm).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (lm + vm).backward()


# -----------------------------------------------------------------------------
# chunked Eq. 9: the stage III loss without (n, C) logits


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_vm_fit_equals_full_formula(chunk_size):
    """Value and gradients (W_VM and X_image) equal the full-logits vm_fit_loss and a float64
    KL(Q || P') written out here; nothing reaches the decoder's rows or W_MM."""
    hidden, w_mm, _, image_mask, x_image, w_vm = make_hidden_batch(9, torch.float32)
    keep = image_mask.clone()
    keep[:, 0] = False  # the image rows that have a predicting position (none before t = 0)
    keep = keep[image_mask]
    h_q = hidden[:, :-1][image_mask[:, 1:]].requires_grad_()  # (n, d) the predicting positions
    x = x_image[keep].clone().requires_grad_()  # (n, d) X_image at t + 1
    wm = w_mm.clone().requires_grad_()
    wv = w_vm.clone().requires_grad_()
    n = x.shape[0]

    loss = losses.chunked_vm_fit_loss(h_q, wm, x, wv, chunk_size=chunk_size)
    g_x, g_w = torch.autograd.grad(loss, (x, wv))

    # float64 reference, from the definition
    x64, wv64 = x.detach().double().requires_grad_(), wv.detach().double().requires_grad_()
    q = torch.softmax(h_q.detach().double() @ w_mm.double().T, -1)
    log_p = torch.log_softmax(x64 @ wv64.T, -1)
    ref = (q * (q.log() - log_p)).sum() / n
    r_x, r_w = torch.autograd.grad(ref, (x64, wv64))
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert torch.allclose(g_x.double(), r_x, rtol=1e-4, atol=1e-7)
    assert torch.allclose(g_w.double(), r_w, rtol=1e-4, atol=1e-7)

    # the full-logits loss of losses.py on the same rows: same value, same gradients
    full = losses.vm_fit_loss(hidden @ w_mm.T, x_image @ wv.T, image_mask)
    f_w, = torch.autograd.grad(full, (wv,))
    assert torch.allclose(loss, full, rtol=1e-5)
    assert torch.allclose(g_w, f_w, rtol=1e-4, atol=1e-7)

    # an external count divides the same sum; the decoder side never gets a gradient
    loss = losses.chunked_vm_fit_loss(h_q, wm, x, wv, num_positions=3 * n, chunk_size=chunk_size)
    assert torch.allclose(loss, ref.float() / 3, rtol=1e-5)
    loss.backward()
    assert h_q.grad is None and wm.grad is None and wv.grad is not None


def test_chunked_vm_fit_bf16_within_tolerance_and_no_full_logits():
    g = torch.Generator().manual_seed(3)
    n, c, d, chunk = 30, 64, 8, 4
    h_q, x = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w_mm, w_vm = torch.randn(c, d, generator=g) / 2, (torch.randn(c, d, generator=g) / 2).requires_grad_()
    ref = losses.vm_fit_rows(h_q @ w_mm.T, x @ w_vm.T)
    r_w, = torch.autograd.grad(ref, (w_vm,))
    with PeakNumel() as mode:
        loss = losses.chunked_vm_fit_loss(h_q, w_mm, x, w_vm, chunk_size=chunk)
        loss.backward()
    assert mode.peak <= max(chunk * c, c * d, n * d) < n * c  # never (n, C) logits
    w_vm.grad = None
    loss = losses.chunked_vm_fit_loss(h_q.bfloat16(), w_mm.bfloat16(), x.bfloat16(), w_vm, chunk_size=chunk,
                                      dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-2 * ref.item()  # the stated bf16 tolerance: 1% of the loss
    assert (w_vm.grad - r_w).abs().max() <= 3e-2 * r_w.abs().max()


# -----------------------------------------------------------------------------
# the readable path trains as the fused one: Objective(fused=False) against the default

@pytest.mark.parametrize("stage", [0, 3, 4])
def test_readable_objective_trains_as_the_fused_one(stage):
    """A few SGD steps of one stage (its objective and trained modules as train.STAGES says), once through
    the formulas on full logits (fused=False) and once through fused_losses.py: every step's loss terms
    and every gradient agree within float32 rounding, so the two runs stay together. (SGD, not AdamW:
    Adam divides a gradient element by its own size, so rounding in gradients that are ~0 would become
    whole steps apart, which says nothing about the losses.)"""
    import copy

    import train
    from model import DecoderConfig, VisionConfig, VTLMM, VTLMMConfig
    cfg = VTLMMConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp=32),
                      decoder=DecoderConfig(dim=32, layers=2, heads=4, kv_heads=2, hidden=64, vocab_size=97,
                                            max_seq_len=64))
    torch.manual_seed(0)
    readable = VTLMM(cfg)
    train.set_trainable(readable, stage)
    fused = copy.deepcopy(readable)
    name = train.STAGES[stage]["objective"]
    runs = [(losses.Objective(m, name, fused=f, chunk_size=5), m) for m, f in ((readable, False), (fused, True))]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for _, m in runs]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        B, T, n_img = 3, 20, cfg.vision.num_patches
        ids = torch.randint(3, cfg.decoder.vocab_size, (B, T), generator=g)
        ids[:, 2:2 + n_img] = cfg.image_token_id
        ids[2, :n_img] = cfg.image_token_id  # an image at t = 0: its first patch is predicted by nobody
        ids[2, n_img:n_img + 2] = ids[2, n_img + 2]
        labels = ids.masked_fill(ids == cfg.image_token_id, -100)
        labels[:, :2] = -100
        px = torch.randn(B, 3, 16, 16, generator=g)
        got = []
        for (objective, m), opt in zip(runs, opts):
            total, lm, vm = objective(ids, px, labels, lm_count=torch.tensor(40), vm_count=torch.tensor(11))
            total.backward()
            got.append(([t.item() for t in (total, lm, vm)],
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
            opt.step()
            opt.zero_grad(set_to_none=True)
        (lr, gr), (lf, gf) = got
        assert lr == pytest.approx(lf, rel=1e-5, abs=1e-6), (step, lr, lf)
        assert set(gr) == set(gf) and gr, step
        for n in gr:
            scale = gr[n].abs().max().item()
            assert (gr[n] - gf[n]).abs().max().item() <= 1e-4 * scale + 1e-8, (step, n)
    assert (lr[2] > 0) == (stage != 0)  # the VM term took part where the stage has one
