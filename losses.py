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

Contents: the rows of a batch (the shift) -> the losses on full logits (Eqs. 4, 6, 7, 9) -> the same
losses without full logits, through fused_losses.py -> `Objective`, the loss of each stage. To follow a
training step, read `batch_rows`, the four losses and `Objective` with fused=False; fused_losses.py is
the fast path, the same numbers with less memory.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fused_losses import fused_mm_loss, fused_vm_fit_loss

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
# the same terms without full logits (training's default): fused_losses.py computes them chunk by chunk
# with the heads fused in; these two take what the functions above take, less the logits


def chunked_mm_loss(hidden, mm_head_weight, labels=None, image_mask=None, image_features=None, vm_head_weight=None,
                    lm_count=None, vm_count=None, chunk_size=None, rows=None, dtype=None):
    """(lm, vm) of `mm_loss` from hidden (B, T, d), the final-norm decoder output, and the heads' weights
    W_MM, W_VM (C, d), where logits = hidden W_MM^T and visual_logits = image_features W_VM^T
    (image_features (N, d): X_image, row-major). labels=None drops the LM term, image_mask=None or
    image_features=None the VM term (it is then 0). `rows`: the batch's `Rows` if built already.
    `chunk_size`, `dtype`: see fused_losses.fused_mm_loss."""
    use_vm = image_mask is not None and image_features is not None
    if rows is None:
        rows = batch_rows(labels, image_mask if use_vm else None)
    rows = rows.to(hidden.device)
    h = _flat(hidden)  # (B * T, d)
    h_lm, targets = (h.index_select(0, rows.lm), rows.targets) if labels is not None else (h[:0], rows.targets[:0])
    if use_vm:
        _check_visual(image_features, rows)
        h_vm, x_vm, w_vm = h.index_select(0, rows.vm), image_features.index_select(0, rows.vm_keep), vm_head_weight
    else:
        h_vm, x_vm, w_vm = h[:0], hidden.new_zeros(0, h.shape[1]), mm_head_weight.new_zeros(0, h.shape[1])
    return fused_mm_loss(h_lm, targets, h_vm, x_vm, mm_head_weight, w_vm, _count(h_lm.shape[0], lm_count, h.device),
                         _count(h_vm.shape[0], vm_count, h.device), chunk_size, dtype)


def chunked_vm_fit_loss(q_hidden, mm_head_weight, x_image, vm_head_weight, num_positions=None, chunk_size=None,
                        dtype=None):
    """`vm_fit_rows(q_hidden W_MM^T, x_image W_VM^T, num_positions)` for rows already paired: q_hidden (n, d)
    at the predicting positions t, x_image (n, d) X_image at t + 1."""
    return fused_vm_fit_loss(q_hidden, mm_head_weight, x_image, vm_head_weight,
                             _count(x_image.shape[0], num_positions, x_image.device), chunk_size, dtype)


# -----------------------------------------------------------------------------
# the loss of each stage objective, from the model's hidden states


class Objective(nn.Module):
    """The training loss of one stage objective (docs/method.md §Stages); forward returns (loss, lm, vm):

        "lm"      Eq. 4                   stages 0, I, II, and IV with the VM term off (TrainConfig.vm_loss)
        "vm_fit"  Eq. 9                   stage III: the model runs without gradients, the VM head alone trains
        "mm"      Eq. 7 = Eq. 4 + Eq. 6   stage IV

    fused=False: the model gives its full logits and the functions above compute the loss, as written
    in the paper. fused=True (the default, TrainConfig.fused_loss): the model gives hidden states only and
    the heads' weights enter fused_losses.py, so that no (B, T, C) logits are ever formed; the same losses
    and gradients within float rounding (tests/test_losses.py). Under FSDP2 this module is the root
    (train.parallelize): the model's own weights, the heads' among them, are gathered around its forward."""

    NAMES = ("lm", "vm_fit", "mm")

    def __init__(self, model, name, chunk_size=None, fused=True):
        super().__init__()
        if name not in self.NAMES:
            raise ValueError(f"unknown objective {name!r}; choose from {self.NAMES}")
        self.model, self.name, self.chunk_size, self.fused = model, name, chunk_size, fused

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
            out = m(input_ids, pixel_values, attention_mask, image_rows=rows.image, logits=not self.fused)
        if fit and out.image_features is None:
            raise ValueError("objective vm_fit: the batch has no images")

        if not self.fused:  # the paper's formulas on full logits
            if fit:  # the VM head's logits of X_image, the one part that trains, against the frozen Q
                vm = vm_fit_loss(out.logits, m.vm_head(out.image_features), out.image_mask, vm_count)
                return vm, torch.zeros_like(vm), vm
            lm = lm_loss(out.logits, labels, lm_count)
            if self.name == "lm":
                return lm, lm, torch.zeros_like(lm)
            return mm_loss(out.logits, labels, m.vm_head(out.image_features), out.image_mask, lm_count, vm_count)

        if fit:
            h_q = _flat(out.hidden).index_select(0, rows.vm)  # (n, d): z_t = W_MM h_q
            x_vm = out.image_features.index_select(0, rows.vm_keep)  # (n, d): P'_{t+1} = softmax(W_VM x_vm)
            vm = chunked_vm_fit_loss(h_q, m.mm_head.weight, x_vm, m.vm_head.weight, vm_count, self.chunk_size)
            return vm, torch.zeros_like(vm), vm
        use_vm = self.name == "mm"
        lm, vm = chunked_mm_loss(out.hidden, m.mm_head.weight, labels, out.image_mask if use_vm else None,
                                 out.image_features if use_vm else None, m.vm_head.weight, lm_count, vm_count,
                                 self.chunk_size, rows)
        return lm + vm, lm, vm  # Eq. 7 for "mm"; vm is 0 for "lm"
