"""The training losses of VT-LMM (paper Eqs. 4, 6, 7, 9).

Index convention (SPEC §2). Positions t = 0..T-1. z_t = logits[:, t] comes from the MM
head and predicts position t+1; Q_t = softmax(z_t). So

    LM  (Eq. 4)  t runs over {t : labels[:, t+1] != -100}, term CE(z_t, labels[:, t+1])
    VM  (Eq. 6)  t runs over {t : image_mask[:, t+1]},     term KL(P'_{t+1} || Q_t)
    fit (Eq. 9)  same t as VM, roles swapped,              term KL(Q_t || P'_{t+1})

where P'_{t+1} = softmax(W_VM x_{t+1}) is the visual token distribution of the image
patch at position t+1. `visual_logits` (N, C) holds W_VM x for the N positions of
`image_mask` (B, T), in row-major order. An image position at t = 0 has no position
before it to predict it, so its row of `visual_logits` is ignored.

Normalisation: each term is a sum over its positions divided by a count. The count
defaults to the number of positions in the batch given (a plain mean); the trainer
passes the number of positions in the whole optimizer step instead (all micro-batches,
all ranks, see `count_positions`), so that 1 or k accumulation steps, 1 or N ranks,
give the same update. With no positions a loss is 0.0, still attached to the graph.
All losses are computed in float32 and returned as float32 scalars.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions that are not supervised (prompt, image, padding)


# -----------------------------------------------------------------------------
# helpers: which rows take part, and the division by a count

def _lm_rows(labels):
    """(B, T) labels -> (B, T-1) mask of the predicting positions t, and their targets."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask]


def _vm_rows(image_mask):
    """(B, T) image_mask -> (B, T-1) mask of the predicting positions t (image at t+1),
    and an (N,) mask of the rows of visual_logits that have a predicting position."""
    has_predictor = image_mask.clone()
    has_predictor[:, 0] = False  # an image position at t = 0 is predicted by nobody
    return image_mask[:, 1:], has_predictor[image_mask]


def _check_visual(visual_rows, image_mask):
    n = int(image_mask.sum())
    if visual_rows.shape[0] != n:
        raise ValueError(f"visual rows: got {visual_rows.shape[0]}, image_mask has {n} image positions")


def _mean(total, count, default):
    """total / count, with count=None meaning `default` and a count of 0 giving 0.0."""
    count = default if count is None else count
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    return total / count.clamp(min=1)  # with no positions total is an (attached) 0


def _kl_sum(log_p, log_q):
    """sum over rows of KL(p || q) = sum_i p(i) (log p(i) - log q(i)), from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum()


def count_positions(labels=None, image_mask=None):
    """Number of LM and VM positions in a batch, as 0-d long tensors (no host sync), for
    the trainer to sum over micro-batches and all-reduce over ranks."""
    n_lm = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else torch.zeros((), dtype=torch.long)
    n_vm = image_mask[:, 1:].sum() if image_mask is not None else torch.zeros((), dtype=torch.long)
    return n_lm, n_vm


# -----------------------------------------------------------------------------
# the losses, on full logits

def lm_loss(logits, labels, num_positions=None):
    """logits (B, T, C) from the MM head, labels (B, T) with -100 where unsupervised."""
    mask, targets = _lm_rows(labels)
    z = logits[:, :-1][mask].float()  # (n, C) the z_t that predict a label
    # Eq. 4: cross-entropy of z_t against labels[t+1]
    total = F.cross_entropy(z, targets, reduction="sum")
    return _mean(total, num_positions, targets.numel())


def vm_loss(logits, visual_logits, image_mask, num_positions=None):
    """logits (B, T, C) from the MM head; visual_logits (N, C) = W_VM X_image, the target
    (detached: this loss trains the decoder and MM head, never the VM head)."""
    _check_visual(visual_logits, image_mask)
    mask, keep = _vm_rows(image_mask)
    log_q = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (n, C) log Q_t
    log_p = F.log_softmax(visual_logits.detach()[keep].float(), dim=-1)  # (n, C) log P'_{t+1}
    # Eq. 6: KL(P' || Q) over visual positions
    total = _kl_sum(log_p, log_q)
    return _mean(total, num_positions, log_q.shape[0])


def vm_fit_loss(logits, visual_logits, image_mask, num_positions=None):
    """Stage III: fit the VM head to the frozen model. Q is the target (detached: the
    decoder and MM head get no gradient), P' the prediction."""
    _check_visual(visual_logits, image_mask)
    mask, keep = _vm_rows(image_mask)
    return vm_fit_rows(logits[:, :-1][mask], visual_logits[keep], num_positions)


def vm_fit_rows(q_logits, p_logits, num_positions=None):
    """Eq. 9 on rows already paired: q_logits (n, C) = z_t, p_logits (n, C) = W_VM x_{t+1}.
    The trainer uses this to run the MM head on the predicting rows only."""
    log_q = F.log_softmax(q_logits.detach().float(), dim=-1)  # (n, C) log Q_t
    log_p = F.log_softmax(p_logits.float(), dim=-1)  # (n, C) log P'_{t+1}
    # Eq. 9: KL(Q || P') over visual positions, Q the label and P' the logits
    total = _kl_sum(log_q, log_p)
    return _mean(total, num_positions, log_q.shape[0])


def mm_loss(logits, labels, visual_logits, image_mask, lm_count=None, vm_count=None):
    """Stage IV objective. Returns (total, lm, vm)."""
    lm = lm_loss(logits, labels, lm_count)
    vm = vm_loss(logits, visual_logits, image_mask, vm_count)
    # Eq. 7: Loss_MM = Loss_LM + Loss_VM
    return lm + vm, lm, vm


# -----------------------------------------------------------------------------
# the same LM and VM terms without ever holding all the logits (used in training)
#
# For logits z = h W^T and a target distribution p (one-hot for LM, P' for VM), both
# terms have the gradient d/dz = softmax(z) - p per row, so d/dh = (q - p) W and
# d/dW = (q - p)^T h. We compute the loss and these two gradients chunk by chunk in the
# forward pass, keep only the (n, d) gradients and ONE (C, d) gradient for both terms,
# and scale them by grad_output in backward ("fused linear cross-entropy"). Each chunk
# works in place in at most three (chunk, C) float32 buffers, so the loss's peak memory
# is about: the gradient of W + 3 chunks of logits (bench.py measures it).


def _default_chunk(vocab_size):
    """Rows per chunk: about 32 MiB of float32 logits per (chunk, C) buffer (256 rows at C=32000)."""
    return max(1, (1 << 23) // vocab_size)


def _lm_chunk(z, targets):
    """z (c, C) logits, targets (c,) -> summed cross-entropy. Overwrites z with dCE/dz = softmax(z) - onehot."""
    z.sub_(z.amax(-1, keepdim=True))
    z_t = z.gather(1, targets[:, None])  # (c, 1)
    s = z.exp_().sum(-1, keepdim=True)  # z now holds exp(z - max)
    total = (s.log() - z_t).sum()  # Eq. 4: -log softmax(z)[target]
    z.div_(s)
    z[torch.arange(z.shape[0], device=z.device), targets] -= 1
    return total


def _vm_chunk(z, v):
    """z (c, C) MM-head logits, v (c, C) VM-head logits (P' = softmax(v), a constant) -> summed
    KL(P' || Q). Overwrites z with dKL/dz = softmax(z) - P'; v is used as scratch."""
    v.sub_(v.amax(-1, keepdim=True))
    p = v.exp()
    sp = p.sum(-1, keepdim=True)
    p.div_(sp)  # P'
    neg_entropy = v.sub_(sp.log()).mul_(p).sum()  # sum_i P'(i) log P'(i)
    z.sub_(z.amax(-1, keepdim=True))
    cross = (p[:, None, :] @ z[:, :, None]).sum()  # sum_i P'(i) z_i, row dot products without a (c, C) temporary
    s = z.exp_().sum(-1, keepdim=True)
    # Eq. 6: KL(P' || Q) = sum_i P'(i) log P'(i) - sum_i P'(i) (z_i - log sum_j exp z_j)
    total = neg_entropy - cross + s.log().sum()
    z.div_(s).sub_(p)
    return total


def _head_pass(h, w, chunk_loss, chunk_size, scale, grad_h=None, grad_w=None):
    """sum over rows of chunk_loss(h W^T); adds scale * d/dh into grad_h (n, d) and scale * d/dW into
    grad_w (C, d) when given. chunk_loss(z, start, end) returns the chunk's summed loss and leaves
    dloss/dz in z."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        end = min(start + chunk_size, h.shape[0])
        h_chunk = h[start:end].float()  # (c, d)
        z = h_chunk @ w.T  # (c, C) the only MM-head logits alive at any time
        total += chunk_loss(z, start, end)
        if grad_h is not None or grad_w is not None:
            z.mul_(scale)  # now scale * dloss/dz
            if grad_h is not None:
                torch.mm(z, w, out=grad_h[start:end])
            if grad_w is not None:
                grad_w.addmm_(z.T, h_chunk)  # in place: no (C, d) temporary per chunk
    return total


class _FusedHeadLoss(torch.autograd.Function):
    """(lm, vm) = (sum of Eq. 4 rows / lm_count, sum of Eq. 6 rows / vm_count) for the LM rows h_lm (n_lm, d)
    and the VM rows h_vm (n_vm, d) under the MM head W (C, d), computed chunk by chunk."""

    @staticmethod
    def forward(ctx, h_lm, h_vm, weight, targets, x_vm, w_vm, lm_count, vm_count, chunk_size):
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2]
        w = weight.float()  # (C, d), a no-op when the head is float32 already
        lm_scale, vm_scale = 1 / lm_count.clamp(min=1), 1 / vm_count.clamp(min=1)
        grad_w = torch.zeros_like(w) if need_w else None  # one (C, d) buffer for both terms
        gh_lm = torch.empty_like(h_lm, dtype=torch.float32) if need_h else None
        gh_vm = torch.empty_like(h_vm, dtype=torch.float32) if need_h else None

        def lm_rows(z, start, end):
            return _lm_chunk(z, targets[start:end])

        def vm_rows(z, start, end):
            return _vm_chunk(z, x_vm[start:end].float() @ w_vm.T)

        lm = _head_pass(h_lm, w, lm_rows, chunk_size, lm_scale, gh_lm, grad_w) * lm_scale
        vm = _head_pass(h_vm, w, vm_rows, chunk_size, vm_scale, gh_vm, grad_w) * vm_scale
        if need_h:
            ctx.save_for_backward(gh_lm.to(h_lm.dtype), gh_vm.to(h_vm.dtype), h_lm, h_vm, weight, targets, x_vm,
                                  w_vm, lm_count, vm_count)
        else:
            ctx.save_for_backward(None, None, h_lm, h_vm, weight, targets, x_vm, w_vm, lm_count, vm_count)
        # an intermediate, kept on ctx (not saved) so that backward can hand it over without a copy
        ctx.grad_w = grad_w.to(weight.dtype) if need_w else None
        ctx.chunk_size = chunk_size
        return lm, vm

    @staticmethod
    def backward(ctx, g_lm, g_vm):
        gh_lm, gh_vm, h_lm, h_vm, weight, targets, x_vm, w_vm, lm_count, vm_count = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w, ctx.grad_w = ctx.grad_w, None
            if grad_w is None:
                raise RuntimeError("chunked_mm_loss: backward ran twice through the same loss (retain_graph); "
                                   "compute the loss again instead")
            if h_lm.shape[0] == 0 or h_vm.shape[0] == 0 or torch.equal(g_lm, g_vm):
                g = g_lm if h_lm.shape[0] else g_vm  # the usual case: backward of lm + vm (times a constant)
                grad_w.mul_(g.to(grad_w.dtype))
            else:  # lm and vm weighted differently: redo the chunks with those weights (rare, slower)
                w = weight.float()
                acc = torch.zeros_like(w)
                _head_pass(h_lm, w, lambda z, s, e: _lm_chunk(z, targets[s:e]), ctx.chunk_size,
                           g_lm / lm_count.clamp(min=1), grad_w=acc)
                _head_pass(h_vm, w, lambda z, s, e: _vm_chunk(z, x_vm[s:e].float() @ w_vm.T), ctx.chunk_size,
                           g_vm / vm_count.clamp(min=1), grad_w=acc)
                grad_w = acc.to(weight.dtype)
        grad_lm = gh_lm * g_lm.to(gh_lm.dtype) if gh_lm is not None else None
        grad_vm = gh_vm * g_vm.to(gh_vm.dtype) if gh_vm is not None else None
        return grad_lm, grad_vm, grad_w, None, None, None, None, None, None


def chunked_mm_loss(hidden, mm_head_weight, labels=None, image_mask=None, image_features=None,
                    vm_head_weight=None, lm_count=None, vm_count=None, chunk_size=None):
    """LM and VM terms of `mm_loss`, with the MM head fused in. Returns (lm, vm).

    hidden (B, T, d): final-norm decoder output; mm_head_weight (C, d): W_MM.
    image_features (N, d): X_image for the image positions of image_mask, row-major;
    vm_head_weight (C, d): W_VM. The target P' = softmax(X_image W_VM^T) is built chunk
    by chunk as well and carries no gradient. labels=None drops the LM term,
    image_mask=None or image_features=None drops the VM term (that term is then 0).
    Counts as in `mm_loss`; logits are never formed for more than chunk_size rows
    (default: about 32 MiB of float32 logits per chunk).
    """
    with torch.autocast(hidden.device.type, enabled=False):  # the head and softmax run in float32
        return _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                                lm_count, vm_count, chunk_size)


def _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                     lm_count, vm_count, chunk_size):
    d, C = hidden.shape[-1], mm_head_weight.shape[0]
    chunk_size = chunk_size or _default_chunk(C)
    h = hidden[:, :-1]  # (B, T-1, d): position t predicts t+1

    if labels is not None:
        mask, targets = _lm_rows(labels)
        h_lm = h[mask]  # (n_lm, d)
    else:
        h_lm, targets = h.reshape(-1, d)[:0], torch.zeros(0, dtype=torch.long, device=h.device)

    use_vm = image_mask is not None and image_features is not None
    if use_vm:
        _check_visual(image_features, image_mask)
        mask, keep = _vm_rows(image_mask)
        h_vm = h[mask]  # (n_vm, d)
        x_vm = image_features.detach()[keep]  # (n_vm, d) X_image at t+1
        w_vm = vm_head_weight.detach().float()
    else:
        h_vm, x_vm, w_vm = h.reshape(-1, d)[:0], hidden.new_zeros(0, d), mm_head_weight.new_zeros(0, d).float()

    def count(n, given):
        return torch.as_tensor(n if given is None else given, dtype=torch.float32, device=h.device)

    return _FusedHeadLoss.apply(h_lm, h_vm, mm_head_weight, targets, x_vm, w_vm,
                                count(h_lm.shape[0], lm_count), count(h_vm.shape[0], vm_count), chunk_size)
