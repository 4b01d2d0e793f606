"""The training losses of VT-LMM (paper Eqs. 4, 6, 7, 9), and the objective of each stage.

Index convention (docs/method.md §Index convention). Positions t = 0..T-1. z_t = logits[:, t] comes from the MM
head and predicts position t+1; Q_t = softmax(z_t). So

    LM  (Eq. 4)  t runs over {t : labels[:, t+1] != -100}, term CE(z_t, labels[:, t+1])
    VM  (Eq. 6)  t runs over {t : image_mask[:, t+1]},     term KL(P'_{t+1} || Q_t)
    fit (Eq. 9)  same t as VM, roles swapped,              term KL(Q_t || P'_{t+1})

where P'_{t+1} = softmax(W_VM x_{t+1}) is the visual token distribution of the image
patch at position t+1. `visual_logits` (N, C) holds W_VM x for the N positions of
`image_mask` (B, T), in row-major order. An image position at t = 0 has no position
before it to predict it, so its row of `visual_logits` is ignored. The shift t -> t+1 is
written once, in `batch_rows`; every loss below takes its positions from the `Rows` it builds.

Normalisation: each term is a sum over its positions divided by a count. The count
defaults to the number of positions in the batch given (a plain mean); the trainer
passes the number of positions in the whole optimizer step instead (all micro-batches,
all ranks, see `count_positions`), so that 1 or k accumulation steps, 1 or N ranks,
give the same update. With no positions a loss is 0.0, still attached to the graph.
All losses are computed in float32 and returned as float32 scalars.

Contents: the rows of a batch (the shift) -> the losses on full logits (the reference, and the
teaching version) -> the same losses chunked with the heads fused in (training) -> `Objective`,
the loss of each stage objective from the model's hidden states.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of positions that are not supervised (prompt, image, padding)


# -----------------------------------------------------------------------------
# where the terms live in a batch: the index shift, written once


@dataclass
class Rows:
    """The positions of a (B, T) batch that take part in the losses, as flat indices b * T + t into
    its B * T positions (row-major), so that the device does fixed-shape gathers instead of boolean
    indexing (which waits for the host to learn the shape). Built by `batch_rows`."""
    lm: torch.Tensor       # (n_lm,) positions t with a label at t + 1 (Eq. 4)
    targets: torch.Tensor  # (n_lm,) those labels
    vm: torch.Tensor       # (n_vm,) positions t with an image position at t + 1 (Eqs. 6, 9)
    vm_keep: torch.Tensor  # (n_vm,) which of the N image rows (row-major) those t + 1 are
    image: torch.Tensor    # (N,) the image positions

    def to(self, device):
        """To the device without blocking the host (from pinned memory the copy is asynchronous)."""
        if self.lm.device == torch.device(device):
            return self
        return Rows(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def pin_memory(self):
        """Called by DataLoader(pin_memory=True) on each batch's rows."""
        return Rows(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self):
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def batch_rows(labels=None, image_mask=None):
    """Rows of a batch from its labels (B, T) and image mask (B, T); either may be None. This is
    where position t is paired with position t + 1 (docs/method.md §Index convention), for every loss."""
    ref = labels if labels is not None else image_mask
    B, T = ref.shape
    empty = torch.zeros(0, dtype=torch.long, device=ref.device)
    lm = targets = vm = vm_keep = image = empty
    if labels is not None:
        supervised = torch.zeros_like(labels, dtype=torch.bool)
        supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # t predicts the label at t + 1; t = T-1 predicts nothing
        lm = supervised.reshape(-1).nonzero().squeeze(1)
        targets = labels.reshape(-1)[lm + 1]
    if image_mask is not None:
        image = image_mask.reshape(-1).nonzero().squeeze(1)
        vm_keep = (image % T != 0).nonzero().squeeze(1)  # an image position at t = 0 is predicted by nobody
        vm = image[vm_keep] - 1  # t predicts the image position t + 1
    return Rows(lm, targets, vm, vm_keep, image)


def count_positions(labels=None, image_mask=None):
    """Number of LM and VM positions in a batch, as 0-d long tensors, for the trainer to sum over
    micro-batches and all-reduce over ranks (it reads the same numbers off each batch's `Rows`)."""
    rows = batch_rows(labels, image_mask)
    return torch.tensor(rows.lm.numel()), torch.tensor(rows.vm.numel())


# -----------------------------------------------------------------------------
# helpers: the division by a count


def _count(n, given, device):
    """The divisor of a term as a 0-d float32 tensor on `device`, made without a host-device sync."""
    if isinstance(given, torch.Tensor):
        return given.to(device, torch.float32, non_blocking=True)
    return torch.full((), float(n if given is None else given), dtype=torch.float32, device=device)


def _mean(total, count, default):
    """total / count, with count=None meaning `default` and a count of 0 giving 0.0."""
    return total / _count(default, count, total.device).clamp(min=1)  # with no positions total is an (attached) 0


def _kl_sum(log_p, log_q):
    """sum over rows of KL(p || q) = sum_i p(i) (log p(i) - log q(i)), from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum()


def _flat(logits):
    """(B, T, C) -> (B * T, C): row b * T + t is position t of sample b, as in `Rows`."""
    return logits.reshape(-1, logits.shape[-1])


def _check_visual(visual_rows, rows):
    if visual_rows.shape[0] != rows.image.shape[0]:
        raise ValueError(f"visual rows: got {visual_rows.shape[0]}, image_mask has {rows.image.shape[0]} "
                         f"image positions")


# -----------------------------------------------------------------------------
# the losses, on full logits

def lm_loss(logits, labels, num_positions=None):
    """logits (B, T, C) from the MM head, labels (B, T) with -100 where unsupervised."""
    rows = batch_rows(labels)
    z = _flat(logits).index_select(0, rows.lm).float()  # (n, C) the z_t that predict a label
    # Eq. 4: cross-entropy of z_t against labels[t+1]
    total = F.cross_entropy(z, rows.targets, reduction="sum")
    return _mean(total, num_positions, rows.lm.numel())


def vm_loss(logits, visual_logits, image_mask, num_positions=None):
    """logits (B, T, C) from the MM head; visual_logits (N, C) = W_VM X_image, the target
    (detached: this loss trains the decoder and MM head, never the VM head)."""
    rows = batch_rows(None, image_mask)
    _check_visual(visual_logits, rows)
    log_q = F.log_softmax(_flat(logits).index_select(0, rows.vm).float(), dim=-1)  # (n, C) log Q_t
    log_p = F.log_softmax(visual_logits.detach().index_select(0, rows.vm_keep).float(), dim=-1)  # log P'_{t+1}
    # Eq. 6: KL(P' || Q) over visual positions
    total = _kl_sum(log_p, log_q)
    return _mean(total, num_positions, log_q.shape[0])


def vm_fit_loss(logits, visual_logits, image_mask, num_positions=None):
    """Stage III: fit the VM head to the frozen model. Q is the target (detached: the
    decoder and MM head get no gradient), P' the prediction."""
    rows = batch_rows(None, image_mask)
    _check_visual(visual_logits, rows)
    return vm_fit_rows(_flat(logits).index_select(0, rows.vm), visual_logits.index_select(0, rows.vm_keep),
                       num_positions)


def vm_fit_rows(q_logits, p_logits, num_positions=None):
    """Eq. 9 on rows already paired: q_logits (n, C) = z_t, p_logits (n, C) = W_VM x_{t+1}."""
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
    z.scatter_(1, targets[:, None], z.gather(1, targets[:, None]).sub_(1))
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
    dloss/dz in z. The matmuls run in w's dtype (the head's compute dtype: bfloat16 under a bf16
    policy); the logits are turned to float32 before any softmax or sum, and grad_w accumulates in
    float32."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    low = w.dtype != torch.float32
    for start in range(0, h.shape[0], chunk_size):
        end = min(start + chunk_size, h.shape[0])
        h_chunk = h[start:end].to(w.dtype)  # (c, d)
        z = (h_chunk @ w.T).float()  # (c, C) the only MM-head logits alive at any time
        total += chunk_loss(z, start, end)
        if grad_h is not None or grad_w is not None:
            z.mul_(scale)  # now scale * dloss/dz
            dz = z.to(w.dtype) if low else z
            if grad_h is not None:
                if low:
                    grad_h[start:end] = dz @ w
                else:
                    torch.mm(dz, w, out=grad_h[start:end])
            if grad_w is not None:
                if low:  # one rounding of this chunk's share, then a float32 sum over chunks
                    grad_w += dz.T @ h_chunk
                else:
                    grad_w.addmm_(dz.T, h_chunk)  # in place: no (C, d) temporary per chunk
    return total


def head_dtype(hidden, weight):
    """The dtype the heads' matmuls run in: the autocast dtype when autocast is on, else bfloat16 /
    float16 when the decoder's output and the head's weight are already in it (FSDP's bf16 policy),
    else float32. Softmax and log-sums are float32 in every case."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return torch.float32


class _FusedHeadLoss(torch.autograd.Function):
    """(lm, vm) = (sum of Eq. 4 rows / lm_count, sum of Eq. 6 rows / vm_count) for the LM rows h_lm (n_lm, d)
    and the VM rows h_vm (n_vm, d) under the MM head W (C, d), computed chunk by chunk."""

    @staticmethod
    def forward(ctx, h_lm, h_vm, weight, targets, x_vm, w_vm, lm_count, vm_count, chunk_size, dtype):
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2]
        w = weight.to(dtype)  # (C, d) in the compute dtype, a no-op when the head is in it already
        lm_scale, vm_scale = 1 / lm_count.clamp(min=1), 1 / vm_count.clamp(min=1)
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None  # one (C, d) buffer, both terms
        gh_lm = torch.empty_like(h_lm, dtype=torch.float32) if need_h else None
        gh_vm = torch.empty_like(h_vm, dtype=torch.float32) if need_h else None

        def lm_rows(z, start, end):
            return _lm_chunk(z, targets[start:end])

        def vm_rows(z, start, end):
            return _vm_chunk(z, (x_vm[start:end].to(dtype) @ w_vm.T).float())

        lm = _head_pass(h_lm, w, lm_rows, chunk_size, lm_scale, gh_lm, grad_w) * lm_scale
        vm = _head_pass(h_vm, w, vm_rows, chunk_size, vm_scale, gh_vm, grad_w) * vm_scale
        if need_h:
            ctx.save_for_backward(gh_lm.to(h_lm.dtype), gh_vm.to(h_vm.dtype), h_lm, h_vm, weight, targets, x_vm,
                                  w_vm, lm_count, vm_count)
        else:
            ctx.save_for_backward(None, None, h_lm, h_vm, weight, targets, x_vm, w_vm, lm_count, vm_count)
        # an intermediate, kept on ctx (not saved) so that backward can hand it over without a copy
        ctx.grad_w = grad_w.to(weight.dtype) if need_w else None
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
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
            # lm + vm hands both outputs the very same gradient tensor: tell that without a host sync
            same = g_lm is g_vm or (g_lm.data_ptr() == g_vm.data_ptr() and g_lm.stride() == g_vm.stride())
            if h_lm.shape[0] == 0 or h_vm.shape[0] == 0 or same or torch.equal(g_lm, g_vm):
                g = g_lm if h_lm.shape[0] else g_vm  # the usual case: backward of lm + vm (times a constant)
                grad_w.mul_(g.to(grad_w.dtype))
            else:  # lm and vm weighted differently: redo the chunks with those weights (rare, slower)
                w, dt = weight.to(ctx.dtype), ctx.dtype
                acc = torch.zeros_like(w, dtype=torch.float32)
                _head_pass(h_lm, w, lambda z, s, e: _lm_chunk(z, targets[s:e]), ctx.chunk_size,
                           g_lm / lm_count.clamp(min=1), grad_w=acc)
                _head_pass(h_vm, w, lambda z, s, e: _vm_chunk(z, (x_vm[s:e].to(dt) @ w_vm.T).float()),
                           ctx.chunk_size, g_vm / vm_count.clamp(min=1), grad_w=acc)
                grad_w = acc.to(weight.dtype)
        grad_lm = gh_lm * g_lm.to(gh_lm.dtype) if gh_lm is not None else None
        grad_vm = gh_vm * g_vm.to(gh_vm.dtype) if gh_vm is not None else None
        return grad_lm, grad_vm, grad_w, None, None, None, None, None, None, None


def chunked_mm_loss(hidden, mm_head_weight, labels=None, image_mask=None, image_features=None,
                    vm_head_weight=None, lm_count=None, vm_count=None, chunk_size=None, rows=None, dtype=None):
    """LM and VM terms of `mm_loss`, with the MM head fused in. Returns (lm, vm).

    hidden (B, T, d): final-norm decoder output; mm_head_weight (C, d): W_MM.
    image_features (N, d): X_image for the image positions of image_mask, row-major;
    vm_head_weight (C, d): W_VM. The target P' = softmax(X_image W_VM^T) is built chunk
    by chunk as well and carries no gradient. labels=None drops the LM term,
    image_mask=None or image_features=None drops the VM term (that term is then 0).
    Counts as in `mm_loss`; logits are never formed for more than chunk_size rows
    (default: about 32 MiB of float32 logits per chunk). `rows`: the batch's `Rows`, built on
    the CPU beforehand (the trainer does), so that the device never waits for the host; without
    it they are found from labels / image_mask here. `dtype`: the matmuls' dtype (default: see
    `head_dtype`); softmax and sums are float32 either way.
    """
    dtype = dtype or head_dtype(hidden, mm_head_weight)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit from here on
        return _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                                lm_count, vm_count, chunk_size, rows, dtype)


def _chunked_mm_loss(hidden, mm_head_weight, labels, image_mask, image_features, vm_head_weight,
                     lm_count, vm_count, chunk_size, rows, dtype):
    B, T, d = hidden.shape
    C = mm_head_weight.shape[0]
    chunk_size = chunk_size or _default_chunk(C)
    use_vm = image_mask is not None and image_features is not None
    if rows is None:
        rows = batch_rows(labels, image_mask if use_vm else None)
    rows = rows.to(hidden.device)
    h = hidden.reshape(B * T, d)  # flat positions b * T + t; position t predicts t + 1

    if labels is not None:
        h_lm, targets = h.index_select(0, rows.lm), rows.targets  # (n_lm, d), (n_lm,)
    else:
        h_lm, targets = h[:0], torch.zeros(0, dtype=torch.long, device=h.device)

    if use_vm:
        if image_features.shape[0] != rows.image.shape[0]:
            raise ValueError(f"visual rows: got {image_features.shape[0]}, image_mask has "
                             f"{rows.image.shape[0]} image positions")
        h_vm = h.index_select(0, rows.vm)  # (n_vm, d)
        x_vm = image_features.detach().index_select(0, rows.vm_keep)  # (n_vm, d) X_image at t+1
        w_vm = vm_head_weight.detach().to(dtype)
    else:
        h_vm, x_vm, w_vm = h[:0], hidden.new_zeros(0, d), mm_head_weight.new_zeros(0, d).to(dtype)

    return _FusedHeadLoss.apply(h_lm, h_vm, mm_head_weight, targets, x_vm, w_vm,
                                _count(h_lm.shape[0], lm_count, h.device), _count(h_vm.shape[0], vm_count, h.device),
                                chunk_size, dtype)


# -----------------------------------------------------------------------------
# Eq. 9 (stage III) the same way: KL(Q_t || P'_{t+1}) with both heads fused in
#
# Here Q = softmax(h W_MM^T) is the constant target and P' = softmax(x W_VM^T) the prediction,
# so d/dv = softmax(v) - Q for the VM-head logits v, d/dW_VM = (P' - Q)^T x and d/dx = (P' - Q) W_VM.


def _fit_chunk(z, v):
    """z (c, C) MM-head logits (Q = softmax(z), a constant), v (c, C) VM-head logits -> summed
    KL(Q || P'). Overwrites v with dKL/dv = softmax(v) - Q; z is used as scratch. Each row's KL is a
    sum of Q(i) (log Q(i) - log P'(i)) over elementwise differences (no large terms that cancel)."""
    z.sub_(z.amax(-1, keepdim=True))
    q = z.exp()
    sq = q.sum(-1, keepdim=True)
    q.div_(sq)  # Q
    z.sub_(sq.log())  # log Q
    v.sub_(v.amax(-1, keepdim=True))
    v.sub_(v.exp().sum(-1, keepdim=True).log())  # log P'
    # Eq. 9: KL(Q || P') = sum_i Q(i) (log Q(i) - log P'(i)), row dot products without a (c, C) temporary
    total = (q[:, None, :] @ z.sub_(v)[:, :, None]).sum()
    v.exp_().sub_(q)  # softmax(v) - Q
    return total


class _FusedVmFitLoss(torch.autograd.Function):
    """sum of Eq. 9 rows / count for the predicting rows h_q (n, d) under W_MM and the image rows
    x (n, d) under W_VM, chunk by chunk; gradients for x and W_VM, none for h_q or W_MM."""

    @staticmethod
    def forward(ctx, h_q, x, w_mm, w_vm, count, chunk_size, dtype):
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        wq, wv = w_mm.detach().to(dtype), w_vm.to(dtype)
        scale = 1 / count.clamp(min=1)
        grad_w = torch.zeros_like(wv, dtype=torch.float32) if need_w else None
        grad_x = torch.empty_like(x, dtype=torch.float32) if need_x else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        low = dtype != torch.float32
        for start in range(0, x.shape[0], chunk_size):
            end = min(start + chunk_size, x.shape[0])
            x_chunk = x[start:end].to(dtype)  # (c, d)
            z = (h_q[start:end].to(dtype) @ wq.T).float()  # (c, C) the MM head: the target's logits
            v = (x_chunk @ wv.T).float()  # (c, C) the VM head: the prediction's logits
            total += _fit_chunk(z, v)
            del z
            if need_x or need_w:
                v.mul_(scale)  # now scale * dloss/dv
                dv = v.to(dtype) if low else v
                if need_x:
                    grad_x[start:end] = dv @ wv
                if need_w:
                    if low:
                        grad_w += dv.T @ x_chunk
                    else:
                        grad_w.addmm_(dv.T, x_chunk)
        ctx.grads = (grad_x.to(x.dtype) if need_x else None, grad_w.to(w_vm.dtype) if need_w else None)
        return total * scale

    @staticmethod
    def backward(ctx, g):
        grad_x, grad_w = ctx.grads
        if grad_x is None and grad_w is None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            raise RuntimeError("chunked_vm_fit_loss: backward ran twice through the same loss")
        ctx.grads = (None, None)
        g = g.to(torch.float32)
        grad_x = grad_x * g.to(grad_x.dtype) if grad_x is not None else None
        grad_w = grad_w.mul_(g.to(grad_w.dtype)) if grad_w is not None else None
        return None, grad_x, None, grad_w, None, None, None


def chunked_vm_fit_loss(q_hidden, mm_head_weight, x_image, vm_head_weight, num_positions=None, chunk_size=None,
                        dtype=None):
    """Eq. 9 on rows already paired, as `vm_fit_rows(q_hidden @ W_MM^T, x_image @ W_VM^T)` but without
    ever holding (n, C) logits: q_hidden (n, d) decoder outputs at the predicting positions t,
    x_image (n, d) X_image at t + 1. Q is the target (no gradient to q_hidden or W_MM); the
    gradient goes to W_VM (and x_image if it asks for one). Chunks and dtype as in `chunked_mm_loss`."""
    dtype = dtype or head_dtype(x_image, vm_head_weight)
    chunk_size = chunk_size or _default_chunk(mm_head_weight.shape[0])
    with torch.autocast(x_image.device.type, enabled=False):
        return _FusedVmFitLoss.apply(q_hidden.detach(), x_image, mm_head_weight, vm_head_weight,
                                     _count(x_image.shape[0], num_positions, x_image.device), chunk_size, dtype)


# -----------------------------------------------------------------------------
# the loss of each stage objective, from the model's hidden states


class Objective(nn.Module):
    """The training loss of one stage objective (docs/method.md §Stages); forward returns (loss, lm, vm):

        "lm"      Eq. 4                   stages 0, I, II, and IV with the VM term off (TrainConfig.vm_loss)
        "vm_fit"  Eq. 9                   stage III: the model runs without gradients, the VM head alone trains
        "mm"      Eq. 7 = Eq. 4 + Eq. 6   stage IV

    The model gives hidden states only (no logits); the heads' weights enter the chunked, fused losses
    above, so that no (B, T, C) logits are ever formed. Under FSDP2 this module is the root
    (train.parallelize): the model's own weights, the heads' among them, are gathered around its forward."""

    NAMES = ("lm", "vm_fit", "mm")

    def __init__(self, model, name, chunk_size=None):
        super().__init__()
        if name not in self.NAMES:
            raise ValueError(f"unknown objective {name!r}; choose from {self.NAMES}")
        self.model, self.name, self.chunk_size = model, name, chunk_size

    def forward(self, input_ids, pixel_values=None, labels=None, rows=None, lm_count=None, vm_count=None,
                attention_mask=None):
        """input_ids, labels (B, T); pixel_values as for the model. `rows`: the batch's `Rows`, built on the
        CPU beforehand (the trainer's loader does), so that the device never waits for the host; without
        them they are found here. Counts as in `mm_loss` (default: this batch's positions)."""
        m = self.model
        if rows is None:
            rows = batch_rows(labels, input_ids == m.cfg.image_token_id)
        rows = rows.to(input_ids.device)
        fit = self.name == "vm_fit"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fit):  # Eq. 9: Q_t is a fixed target
            out = m(input_ids, pixel_values, attention_mask, image_rows=rows.image, logits=False)
        if fit:
            if out.image_features is None:
                raise ValueError("objective vm_fit: the batch has no images")
            h_q = _flat(out.hidden).index_select(0, rows.vm)  # (n, d): z_t = W_MM h_q
            x_vm = out.image_features.index_select(0, rows.vm_keep)  # (n, d): P'_{t+1} = softmax(W_VM x_vm)
            # Eq. 9, chunked: both heads fused in, no (n, C) logits; the VM head alone gets a gradient
            vm = chunked_vm_fit_loss(h_q, m.mm_head.weight, x_vm, m.vm_head.weight, vm_count, self.chunk_size)
            return vm, torch.zeros_like(vm), vm
        use_vm = self.name == "mm"
        lm, vm = chunked_mm_loss(out.hidden, m.mm_head.weight, labels, out.image_mask if use_vm else None,
                                 out.image_features if use_vm else None, m.vm_head.weight, lm_count, vm_count,
                                 self.chunk_size, rows)
        return lm + vm, lm, vm  # Eq. 7 for "mm"; vm is 0 for "lm"
