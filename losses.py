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
# forward pass, keep only the (n, d) and (C, d) gradients, and scale them by grad_output
# in backward ("fused linear cross-entropy"). Peak extra memory: a few (chunk, C) floats.

class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over rows r of loss_r(h_r W^T) / count, for h (n, d) and W (C, d)."""

    @staticmethod
    def forward(ctx, h, weight, count, chunk_size, target_fn, need_grad):
        # target_fn(z, start, end) -> (summed loss of the rows, target distribution p), float32
        # need_grad is False under torch.no_grad (evaluation): then only the loss is computed
        w = weight.float()  # (C, d), a no-op when the head is float32 already
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h, dtype=torch.float32) if need_grad else None  # (n, d)
        grad_w = torch.zeros_like(w) if need_grad else None  # (C, d)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            h_chunk = h[start:end].float()  # (c, d)
            z = h_chunk @ w.T  # (c, C) the only logits alive at any time
            loss, p = target_fn(z, start, end)
            total += loss
            if need_grad:
                dz = torch.softmax(z, dim=-1).sub_(p)  # (c, C) dloss/dz = q - p
                grad_h[start:end] = dz @ w
                grad_w += dz.T @ h_chunk
        count = count.clamp(min=1)
        if need_grad:
            ctx.save_for_backward((grad_h / count).to(h.dtype), (grad_w / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), grad_w * grad_output.to(grad_w.dtype), None, None, None, None


def chunked_mm_loss(hidden, mm_head_weight, labels=None, image_mask=None, image_features=None,
                    vm_head_weight=None, lm_count=None, vm_count=None, chunk_size=1024):
    """LM and VM terms of `mm_loss`, with the MM head fused in. Returns (lm, vm).

    hidden (B, T, d): final-norm decoder output; mm_head_weight (C, d): W_MM.
    image_features (N, d): X_image for the image positions of image_mask, row-major;
    vm_head_weight (C, d): W_VM. The target P' = softmax(X_image W_VM^T) is built chunk
    by chunk as well and carries no gradient. labels=None drops the LM term,
    image_mask=None or image_features=None drops the VM term (that term is then 0).
    Counts as in `mm_loss`; logits are never formed for more than chunk_size rows.
    """
    with torch.autocast(hidden.device.type, enabled=False):  # the head and softmax run in float32
        return _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                                lm_count, vm_count, chunk_size)


def _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                     lm_count, vm_count, chunk_size):
    h = hidden[:, :-1]  # (B, T-1, d): position t predicts t+1
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or mm_head_weight.requires_grad)
    none = hidden[:, :0].sum().float()  # a 0.0 attached to the graph, for an absent term

    lm = none
    if labels is not None:
        mask, targets = _lm_rows(labels)
        h_lm = h[mask]  # (n_lm, d)

        def lm_target(z, start, end):
            t = targets[start:end]
            return F.cross_entropy(z, t, reduction="sum"), F.one_hot(t, z.shape[-1]).float()

        count = torch.as_tensor(targets.numel() if lm_count is None else lm_count, dtype=torch.float32, device=h.device)
        lm = _ChunkedHeadLoss.apply(h_lm, mm_head_weight, count, chunk_size, lm_target, need_grad)

    vm = none
    if image_mask is not None and image_features is not None:
        _check_visual(image_features, image_mask)
        mask, keep = _vm_rows(image_mask)
        h_vm = h[mask]  # (n_vm, d)
        x_vm = image_features.detach()[keep]  # (n_vm, d) X_image at t+1
        w_vm = vm_head_weight.detach().float()

        def vm_target(z, start, end):
            log_p = F.log_softmax(x_vm[start:end].float() @ w_vm.T, dim=-1)  # log P'_{t+1}
            return _kl_sum(log_p, F.log_softmax(z, dim=-1)), log_p.exp()

        count = torch.as_tensor(h_vm.shape[0] if vm_count is None else vm_count, dtype=torch.float32, device=h.device)
        vm = _ChunkedHeadLoss.apply(h_vm, mm_head_weight, count, chunk_size, vm_target, need_grad)
    return lm, vm
