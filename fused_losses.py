"""The training losses of losses.py (Eqs. 4, 6, 9) computed without ever holding all the logits.

losses.py writes each equation on full (B, T, C) logits; that is what to read. At a 7B model's
vocabulary those logits are the largest tensor of a training step (16 x 2048 positions x 32,000
float32 logits: 4 GiB, and as much again for their gradient), so training computes the same numbers
here, chunk by chunk, with the heads fused into the loss ("fused linear cross-entropy"; the chunked
loss of torchtitan is the same idea). `losses.Objective(fused=True)`, the default, uses it; tests check
it against losses.py's functions and float64 references (tests/test_losses.py).

The trick. For logits z = h W^T and a target distribution p (one-hot for Eq. 4, P' for Eq. 6), both
terms have the gradient d/dz = softmax(z) - p per row, so d/dh = (q - p) W and d/dW = (q - p)^T h. The
loss and these two gradients are computed chunk by chunk in the forward pass; only the (n, d) gradients
and ONE (C, d) gradient for both terms are kept, and backward scales them by grad_output. Each chunk
works in place in at most three (chunk, C) float32 buffers, so the loss's peak memory is about the
gradient of W plus three chunks of logits (bench/vs_transformers.py measures it). Eq. 9 (stage III) is the
same with the roles swapped: Q = softmax(h W_MM^T) is the constant target and P' = softmax(x W_VM^T)
the prediction, so d/dv = softmax(v) - Q for the VM-head logits v.

Inputs are rows already paired by the index shift (losses.batch_rows): h_lm (n_lm, d) the decoder
outputs at positions t with a label at t + 1 and their targets; h_vm (n_vm, d) those at positions t with
an image position at t + 1 and x_vm (n_vm, d) X_image at t + 1. Counts are 0-d float32 tensors (the
divisors of losses.py). This module imports nothing of nanoVT's.
"""

import torch


# -----------------------------------------------------------------------------
# Eqs. 4 and 6 (stages 0, I, II, IV): the MM head fused in


def default_chunk(vocab_size):
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
                raise RuntimeError("fused_mm_loss: backward ran twice through the same loss (retain_graph); "
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
            raise RuntimeError("fused_vm_fit_loss: backward ran twice through the same loss")
        ctx.grads = (None, None)
        g = g.to(torch.float32)
        grad_x = grad_x * g.to(grad_x.dtype) if grad_x is not None else None
        grad_w = grad_w.mul_(g.to(grad_w.dtype)) if grad_w is not None else None
        return None, grad_x, None, grad_w, None, None, None


# -----------------------------------------------------------------------------
# the entry points (losses.py calls them)


def fused_mm_loss(h_lm, targets, h_vm, x_vm, mm_head_weight, vm_head_weight, lm_count, vm_count, chunk_size=None,
                  dtype=None):
    """(Eq. 4 summed over the LM rows / lm_count, Eq. 6 summed over the VM rows / vm_count) under the MM head
    W_MM (C, d), as losses.lm_loss and losses.vm_loss give them on full logits. The target P' =
    softmax(x_vm W_VM^T) is built chunk by chunk as well and carries no gradient; h_lm, h_vm and W_MM get
    theirs. `chunk_size`: rows per chunk (default: about 32 MiB of float32 logits); `dtype`: the matmuls'
    dtype (default: head_dtype); softmax and sums are float32 either way."""
    dtype = dtype or head_dtype(h_lm, mm_head_weight)
    chunk_size = chunk_size or default_chunk(mm_head_weight.shape[0])
    with torch.autocast(h_lm.device.type, enabled=False):  # dtypes are explicit from here on
        return _FusedHeadLoss.apply(h_lm, h_vm, mm_head_weight, targets, x_vm.detach(),
                                    vm_head_weight.detach().to(dtype), lm_count, vm_count, chunk_size, dtype)


def fused_vm_fit_loss(q_hidden, mm_head_weight, x_image, vm_head_weight, count, chunk_size=None, dtype=None):
    """Eq. 9 summed over paired rows / count, as losses.vm_fit_rows(q_hidden W_MM^T, x_image W_VM^T): q_hidden
    (n, d) the decoder outputs at the predicting positions t, x_image (n, d) X_image at t + 1. Q is the
    target (no gradient to q_hidden or W_MM); the gradient goes to W_VM (and x_image if it asks for one)."""
    dtype = dtype or head_dtype(x_image, vm_head_weight)
    chunk_size = chunk_size or default_chunk(mm_head_weight.shape[0])
    with torch.autocast(x_image.device.type, enabled=False):
        return _FusedVmFitLoss.apply(q_hidden.detach(), x_image, mm_head_weight, vm_head_weight, count, chunk_size,
                                     dtype)
