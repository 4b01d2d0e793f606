"""
Train nanoVT: the four stages of VT-LMM (docs/method.md §Stages), one code path from one CPU process to
`torchrun --nproc_per_node=8` (FSDP2 + bf16).

    python train.py configs/tiny.py                      # seconds on a CPU
    python train.py configs/shapes.py                    # the demo: stages 0, I-IV, then eval (shapes.py)
    torchrun --nproc_per_node=8 train.py configs/stage4_mistral.py --micro_batch=8
    python train.py configs/tiny.py --resume             # continue from the last checkpoint

A config file is Python that assigns fields of `TrainConfig`; `--key=value` overrides them
(configurator.py). What a run logs, metrics.jsonl with tokens/s and MFU: metrics.py.
A config that sets `stages` (a list of dicts of overrides) runs them in order, each starting
from the final checkpoint of the one before; a stage without its own out_dir writes to out_dir/stageN.

A config may name a side module in `hook`, with its settings: the demo's
`hook = dict(module="shapes", dir="data/shapes", ...)` (shapes.py). train.py knows nothing else of it
and calls three of its functions: prepare_data(cfg) on the main process at the start of each stage,
the others waiting; prepare_model(cfg, model, d) on every process once the model is built, before
anything is frozen or sharded, unless the stage resumes; after_run(cfg, final) on the main process
after the last of `stages`. `--hook.dir=x` sets one entry.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import configurator
import conversation
import data
import errors
import losses
import metrics
import model as model_lib
import weights
from errors import InputError
from model import VTLMM, VTLMMConfig
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    stage: int = 2                 # 0 (toy pretraining), 1, 2, 3 or 4 (see STAGES)
    out_dir: str = "out/run"
    # where the weights come from (one of them)
    init_from: str = ""            # a nanoVT checkpoint or a llava-hf / original LLaVA directory
    clip_path: str = ""            # stage I from released weights: a CLIP directory ...
    llm_path: str = ""             # ... and a Vicuna / Mistral directory, or a GGUF file (docs/weights.md §GGUF)
    vision_path: str = ""          # the CLIP tower of an original-LLaVA / VW-LMM checkpoint
    model: dict = field(default_factory=dict)  # a fresh model: VTLMMConfig fields (vision/decoder dicts)
    reinit: tuple = ()             # modules to re-initialise after loading, e.g. ("adapter",)
    freeze: tuple = ()             # modules the stage would train but keeps frozen, e.g. ("vision",) in stage 0
    pseudo_image_features: Optional[bool] = None  # Eq. 8 switch (None: as the checkpoint says)
    vm_loss: bool = True           # stage IV: False trains LM only on the same data (ablation control)
    # data
    data_path: str = ""            # LLaVA JSON (stage III: a JSON or a folder of images)
    image_folder: str = ""         # default: the JSON's directory
    tokenizer: str = ""            # tokenizer.model file or directory; default: init_from / llm_path
    template: str = ""             # plain / vicuna_v1 / mistral_instruct; default: stage I plain, else the model's
    max_len: int = 2048
    group_by_length: bool = True
    strict_data: bool = False
    max_missing_images: float = 0.5  # stop before step 1 when more of the image samples lack their file (a folder
                                     # not mounted, a wrong image_folder); 1.0 trains on what is there
    allow_outside_images: bool = False  # image paths may leave image_folder (.., absolute, symlinks out)
    num_workers: int = -1          # DataLoader worker processes per rank; -1: 4 on GPUs, 0 on CPUs
    prefetch_factor: int = 4       # batches each worker prepares ahead (with num_workers > 0)
    # optimisation (docs/method.md §Training settings: AdamW, no weight decay, cosine with 3% warm-up)
    global_batch: int = 128
    micro_batch: int = 4           # per device; accumulation = global / (micro * world)
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0             # > 0 caps the number of optimizer steps (and sets the schedule's length)
    stop_at: int = 0               # > 0: save and exit after this step, as a preempted job would
    seed: int = 0
    # systems
    dtype: str = "auto"            # bf16, fp32, or auto = bf16 on GPUs, fp32 on CPUs (FSDP policy / autocast)
    fsdp: str = "auto"             # auto (when more than one process), on, off
    activation_checkpointing: bool = True
    compile: bool = False          # torch.compile each decoder and vision block (train.compile_blocks); off: see docs/training.md
    device: str = "auto"
    fused_loss: bool = True        # the losses without full logits (fused_losses.py); off: losses.py's formulas on full logits
    loss_chunk: int = 0            # rows per chunk of the fused head + loss (0: about 32 MiB of logits)
    peak_flops: float = 0.0        # FLOP/s of one device for MFU (0: from the table by device name and dtype)
    # bookkeeping
    log_every: int = 10
    save_every: int = 500          # optimizer steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 2      # this run's newest step checkpoints kept (older ones of this run pruned)
    async_save: bool = False       # write step checkpoints in the background while training goes on
    final_dtype: str = "fp32"      # dtype of final/model.safetensors: fp32, bf16 or fp16
    resume: bool = False           # continue from out_dir's newest complete step checkpoint
    overwrite: bool = False        # start over in a non-empty out_dir (deletes its checkpoints and final/)
    allow_resume_changes: bool = False  # --resume although stage, data, batch or schedule differ
    max_skipped_steps: int = 3     # non-finite steps in a row skipped (no update) before the run stops
    dist_timeout_min: float = 30.0  # process-group timeout (NCCL's default is 10 minutes)
    stages: list = field(default_factory=list)
    hook: dict = field(default_factory=dict)  # dict(module="shapes", ...): a side module's settings (see top)


# What each stage trains and with which loss (docs/method.md §Stages; the objective is a losses.Objective name). The
# vision tower is never trained, except in the toy stage 0, which stands in for CLIP's and Vicuna's own pretraining.
STAGES = {
    0: dict(train=("vision", "adapter", "decoder", "mm_head"), objective="lm"),
    1: dict(train=("adapter",), objective="lm"),                      # LM (Eq. 4)
    2: dict(train=("adapter", "decoder", "mm_head"), objective="lm"),  # LM (Eq. 4)
    3: dict(train=("vm_head",), objective="vm_fit"),                  # VM fit (Eq. 9)
    4: dict(train=("decoder", "mm_head"), objective="mm"),            # MM = LM + VM (Eq. 7)
}


# ----------------------------------------------------------------------------------------------
# config files and overrides (configurator.py)


def load_config(argv):
    """argv: [CONFIG_FILE] [--key=value ...] -> TrainConfig, each stage's overrides and the stage checked."""
    cfg = configurator.parse(TrainConfig, argv)
    for s in cfg.stages:
        configurator.check_fields(TrainConfig, s, "stages")
    if cfg.stage not in STAGES:
        raise InputError(f"stage must be one of {sorted(STAGES)}, got {cfg.stage}")
    if not 0 <= cfg.max_missing_images <= 1:
        raise InputError(f"max_missing_images must be a share between 0 and 1, got {cfg.max_missing_images}")
    return cfg


# ----------------------------------------------------------------------------------------------
# distributed setup and the model


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(cfg):
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = cfg.device
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(dev_type, local) if dev_type == "cuda" else torch.device(dev_type)
    if dev_type == "cuda":
        torch.cuda.set_device(device)
        # float32 matmuls (fp32 runs, anything outside the bf16 policy) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dev_type == "cpu" and (cfg.fsdp == "on" or (cfg.fsdp == "auto" and world > 1)):
        return_large_frees_to_os()  # before any weight is read: sharded loading is the first to allocate
    if (world > 1 or cfg.fsdp == "on") and not dist.is_initialized():
        backend = "nccl" if dev_type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=cfg.dist_timeout_min)
        if world == 1:  # FSDP on one process (tests): a process group of one, in memory, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return Dist(int(os.environ.get("RANK", 0)), world, local, device)


# Kept in train.py, beside the process-group setup that calls it: a host-memory setting of FSDP2 on CPUs,
# which only training needs (inference and the tests never call it).
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_large_frees_to_os(threshold=1 << 20):
    """Host memory of FSDP2 on CPUs: make glibc serve every allocation of `threshold` bytes or more with a
    mapping of its own, handed back to the OS when freed. By default glibc raises that threshold each time
    a mapped block is freed (up to 32 MiB), so after the first unshard a block's all-gathered weights come
    from the heap; freed there, they are split for other sizes, the heap grows block after block, and the
    process keeps the pages: a stage III step on 2 gloo ranks peaked at 1.0-1.5x the float32 model on a
    rank holding half of it, and kept a third of that (tests/stage_memory.py; docs/training.md §Host memory
    (FSDP on CPUs)). Setting the threshold fixes it (no more raising). Smaller allocations stay on the heap.
    Does nothing off glibc or when MALLOC_MMAP_THRESHOLD_ is set in the environment (the user's choice
    wins). Returns whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def build_model(cfg: TrainConfig, tok=None, dtype=torch.float32, sources=None):
    """The model in float32 on the CPU, from released weights, a checkpoint, or fresh (a fresh
    decoder takes the tokenizer's vocabulary size unless the config gives one). With `sources` (a
    weights.ShardSources) the weights are not read: the model stays on the meta device, `sources` says
    where each tensor lives, and `load_sharded` fills the model after `parallelize` (sharded loading)."""
    over = {} if cfg.pseudo_image_features is None else {"pseudo_image_features": cfg.pseudo_image_features}
    lazy = contextlib.nullcontext(None) if sources is None else weights.lazy_loading()
    from gguf_file import is_gguf
    for key in ("init_from", "clip_path", "llm_path", "vision_path"):
        where = getattr(cfg, key)
        gguf_ok = key in ("init_from", "llm_path") and is_gguf(where)  # an LLM alone, in one GGUF file
        if where and not os.path.isdir(where) and not gguf_ok:
            raise InputError(f"{key}={where}: no such directory (a checkpoint directory"
                             + (" or a GGUF file" if key in ("init_from", "llm_path") else "") + " is expected)")
    with lazy as found:
        if cfg.init_from:
            model = weights.from_pretrained(cfg.init_from, dtype=dtype, vision_path=cfg.vision_path or None, **over)
        elif cfg.clip_path or cfg.llm_path:
            # no CLIP: a fresh tower of the config's shape, which the hook pretrains (the toy world)
            vision = model_lib.VisionConfig(**cfg.model["vision"]) if not cfg.clip_path and cfg.model.get("vision") else None
            model = weights.from_clip_and_llm(cfg.clip_path, cfg.llm_path, dtype=dtype, vision=vision, **over)
        elif cfg.model:
            if sources is not None:
                raise ValueError("sharded loading needs weights to read (init_from, or clip_path + llm_path)")
            m = dict(cfg.model)
            dec = m.pop("decoder", {})
            if tok is not None and isinstance(dec, dict):
                dec = {"vocab_size": tok.vocab_size, **dec}
            mcfg = VTLMMConfig.from_dict({**m, "decoder": dec, **over}, "the config's model")
            torch.manual_seed(cfg.seed)
            model = VTLMM(mcfg)
        else:
            raise InputError("set one of init_from, clip_path + llm_path, or model")
    if sources is not None:
        sources.where, sources.rng = found.where, found.rng
        return model  # reinit happens in load_sharded, after the weights
    reinit_modules(model, cfg)
    return model


def reinit_modules(model, cfg: TrainConfig):
    """Re-initialise the modules of cfg.reinit with model.init_weights (sharded or not: each full tensor is
    drawn, then each rank keeps its rows, so that sharded and full loading give the same weights)."""
    for name in cfg.reinit:
        torch.manual_seed(cfg.seed + 1)
        model_lib.init_weights(getattr(model, name))


def uses_fsdp(cfg: TrainConfig, d):
    """FSDP2 shards the model: fsdp=on, or auto with more than one process."""
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and d.world > 1)


def sharded_loading(cfg: TrainConfig, d):
    """Read weights shard by shard (each rank only its rows) when FSDP shards the model and there are
    weights to read; a hook's prepare_model (the toy vision pretraining) needs the whole model first."""
    return uses_fsdp(cfg, d) and bool(cfg.init_from or cfg.clip_path or cfg.llm_path) and not cfg.hook


def load_sharded(model, sources, cfg: TrainConfig, d):
    """After parallelize: give the meta shards memory on the device, read each rank's rows, re-init."""
    model.to_empty(device=d.device)
    weights.load_shards(model, sources)
    reinit_modules(model, cfg)
    return model


def load_hook(cfg):
    """The module `cfg.hook` names (its "module" entry), or None."""
    if not cfg.hook:
        return None
    if "module" not in cfg.hook:
        raise InputError(f"hook {cfg.hook}: name the module, e.g. hook = dict(module=\"shapes\", ...)")
    return importlib.import_module(cfg.hook["module"])


def make_optimizer(params, cfg, device):
    """AdamW (docs/method.md §Training settings) with its fast paths: one fused kernel per step on GPUs, multi-tensor (foreach)
    on CPUs; both give the plain per-tensor update up to rounding (tests/test_throughput.py)."""
    fast = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fast)


def set_trainable(model, stage, freeze=()):
    """requires_grad on exactly the stage's modules (docs/method.md §Stages), less `freeze`; returns the trainable names."""
    train = [m for m in STAGES[stage]["train"] if m not in freeze]
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in train)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parallelize(model, cfg, d: Dist, root=None):
    """torchtitan's order: activation checkpointing per block, compile, fully_shard per block, root.
    root: the module the training step calls (a losses.Objective holding `model`), default the model.
    The root's FSDP unit holds the model's own weights (embedding, adapter, heads, final norm), so they
    are gathered around its forward, where the loss uses the heads; the model stays a plain VTLMM
    (its state-dict keys, hence the checkpoints, do not depend on the root)."""
    if cfg.activation_checkpointing:
        model.set_checkpointing(True)
    if cfg.compile:
        if can_compile(d.device):
            compile_blocks(model)
        elif d.main:
            print("compile: no C++ compiler found (g++, clang++ or $CXX), which torch.compile needs on a CPU; "
                  "training without it", flush=True)
    if not uses_fsdp(cfg, d):
        if d.world > 1:
            raise InputError("several processes need fsdp=on (it is what synchronises their gradients)")
        return model.to(d.device), False
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if resolve_dtype(cfg, d) == "bf16" else torch.float32,
                              reduce_dtype=torch.float32)
    mesh = dist.device_mesh.init_device_mesh(d.device.type, (d.world,))
    for block in model.decoder.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model.vision, mesh=mesh, mp_policy=mp)
    # the root: embedding, adapter, heads, final norm. It keeps its inputs' dtypes: the loss's counts must
    # not be rounded to bf16 (each part below casts what it receives itself)
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False)
    unit = model if root is None else root
    fully_shard(unit, mesh=mesh, mp_policy=root_mp)
    if d.device.type == "cpu" and hasattr(unit, "_set_unshard_async_op"):
        # In forward FSDP2 keeps each all-gather's flat output until the next unit's all-gather has
        # finished, so that on a GPU the copy-out overlaps it on another stream. A CPU has no such stream,
        # and the kept buffer is one more unsharded block at the peak; waiting on the all-gather instead
        # frees it right after its copy-out (FSDPModule._set_unshard_async_op; the order is unchanged).
        unit._set_unshard_async_op(True)
    return model, True


def can_compile(device):
    """Whether torch.compile can work here: on a CPU inductor writes C++ and needs a compiler for it;
    without one the first compiled step would fail, so train.py trains eagerly instead (and says so)."""
    if device.type != "cpu":
        return True
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


def compile_blocks(model):
    """torch.compile each decoder block and each vision block in place (nn.Module.compile: the module
    stays where it is, so parameter names, state dicts and FSDP2's units do not change). One block is
    the unit, as in torchtitan: the blocks of a model share one compiled graph, so compile time does not
    grow with depth, and FSDP2's hooks (gather before, free after) stay outside the graph. A block under
    activation checkpointing is compiled with its checkpoint (the recompute is compiled too). The
    sequence length varies between batches: after the second length Dynamo compiles a graph with a
    symbolic length and reuses it (automatic dynamic shapes)."""
    for block in list(model.decoder.blocks) + list(model.vision.blocks):
        block.compile(dynamic=True)
    return model


# ----------------------------------------------------------------------------------------------
# data


def resolve_dtype(cfg, d):
    if cfg.dtype == "auto":
        return "bf16" if d.device.type == "cuda" else "fp32"
    if cfg.dtype not in ("bf16", "fp32"):
        raise InputError(f"dtype must be bf16, fp32 or auto, got {cfg.dtype!r}")
    return cfg.dtype


def stage_template(cfg, model):
    if cfg.template:
        if cfg.template not in conversation.TEMPLATES:
            raise InputError(f"template {cfg.template!r} is unknown; choose from {conversation.TEMPLATES}")
        return cfg.template
    return "plain" if cfg.stage in (0, 1) else model.cfg.template


def find_tokenizer(cfg):
    for p in (cfg.tokenizer, cfg.init_from, cfg.llm_path):
        if p and not os.path.isfile(p):
            p = os.path.join(p, "tokenizer.model")
        if p and os.path.isfile(p):
            try:
                return load_tokenizer(p), p
            except Exception as e:  # not a tokenizer file: sentencepiece, tiktoken and ours raise many kinds
                first = (str(e).splitlines() or [""])[0]
                raise InputError(f"cannot read tokenizer {p}: {type(e).__name__}: {first}") from None
    raise InputError("no tokenizer: set tokenizer=PATH (a tokenizer.model or its directory)")


def build_dataset(cfg, model, tok):
    mc = model.cfg
    folder = cfg.image_folder or None
    if not cfg.data_path:
        raise InputError("set data_path (a LLaVA JSON; stage III: a JSON or a folder of images)")
    if not os.path.exists(cfg.data_path):
        raise InputError(f"data_path={cfg.data_path}: no such file or directory")
    if folder and not os.path.isdir(folder):
        raise InputError(f"image_folder={folder}: no such directory (is its disk mounted?)")
    checks = dict(strict=cfg.strict_data, allow_outside=cfg.allow_outside_images, max_missing=cfg.max_missing_images)
    if cfg.stage == 3:
        return data.ImageOnlyDataset(cfg.data_path, tok, mc.vision.image_size, mc.vision.num_patches,
                                     mc.image_token_id, image_folder=folder, **checks)
    template, cache_dir = stage_template(cfg, model), os.path.join(cfg.out_dir, "data_cache")
    return once_per_node(lambda first: data.LlavaDataset(
        cfg.data_path, folder, tok, template, mc.vision.image_size, mc.vision.num_patches, mc.image_token_id,
        max_len=cfg.max_len, cache_dir=cache_dir, write_cache=first, **checks))


def once_per_node(make):
    """make(first) on every process, the node's first (LOCAL_RANK 0) before the others: it reads the
    JSON and writes the read cache (data.ReadCache) into out_dir/data_cache; the rest wait at a
    barrier, then map those files (their samples are the page cache, shared), so a node parses the
    file once, not once per GPU. out_dir holds the cache because this run owns it (one writer, never
    another run's half-written files) and it is writable, which the data's folder need not be."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result = make(True) if first else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return result if first else make(False)


def data_report(dataset, d: Dist):
    """The dataset's report with the samples skipped while loading on every rank (each rank loads
    its own share; DataLoader workers' skips reached it with the batches)."""
    if d.world > 1:
        per_rank = [None] * d.world
        dist.all_gather_object(per_rank, dataset.load_skips())
        dataset.merge_load_skips(per_rank)
    return dataset.report()


def batches(dataset, cfg, d: Dist, tok, epoch, skip, image_token_id):
    """Micro-batches of this rank for one epoch, starting after `skip` of its samples. Each batch also
    carries its `rows` (losses.Rows): found in the loader's workers, from the CPU tensors."""
    # the sampler groups by optimizer step (global_batch samples): which samples make a step does
    # not depend on the number of processes or accumulation steps
    sampler = data.make_sampler(dataset, cfg.global_batch // d.world, cfg.seed, epoch, d.rank, d.world,
                                cfg.group_by_length, skip)
    workers = loader_workers(cfg, d)
    cuda = d.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.micro_batch, sampler=sampler,
        collate_fn=functools.partial(collate_with_rows, pad_id=tok.pad_id, image_token_id=image_token_id),
        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None)
    return iter(loader)


def loader_workers(cfg, d: Dist):
    """num_workers = -1: 4 worker processes per rank on GPUs (image decoding keeps up with the GPU),
    none on CPUs (where the cores train)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(4, max(1, (os.cpu_count() or 1) // max(1, d.world) - 1)) if d.device.type == "cuda" else 0


def collate_with_rows(samples, pad_id, image_token_id):
    """data.collate, plus the batch's loss rows found here on the CPU (so a micro-step needs no sync)."""
    b = data.collate(samples, pad_id)
    b["rows"] = losses.batch_rows(b["labels"], b["input_ids"] == image_token_id)
    return b


# ----------------------------------------------------------------------------------------------
# schedule and checkpoints (the logging: metrics.py)


def lr_at(step, total, cfg):
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to min_lr_ratio * lr."""
    warm = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def data_position(step, steps_per_epoch, cfg):
    """Where the data stands after `step` optimizer steps, as plain ints (saved in checkpoints).
    Each epoch is exactly steps_per_epoch steps; samples count over all processes, so a run
    resumes on another number of processes at the same sample."""
    return {"epoch": step // steps_per_epoch, "samples_in_epoch": (step % steps_per_epoch) * cfg.global_batch,
            "samples_seen": step * cfg.global_batch}


def run_fingerprint(cfg, model, dataset, total):
    """What makes a run this run: --resume refuses a checkpoint whose fingerprint differs
    (checkpoint.fingerprint_diff names the fields)."""
    return {"model": model.cfg.to_dict(), "stage": cfg.stage, "freeze": list(cfg.freeze), "data_path": cfg.data_path,
            "samples": len(dataset), "global_batch": cfg.global_batch, "total_steps": total, "seed": cfg.seed}


# ----------------------------------------------------------------------------------------------
# one stage: the loop, setup, one optimizer step, checkpoints


def train_stage(cfg: TrainConfig, d: Dist):
    """Train one stage into cfg.out_dir, which this run owns (checkpoint.claim_out_dir) until it returns."""
    final = os.path.join(cfg.out_dir, "final")
    if cfg.resume and checkpoint.is_final(final):
        if d.main:
            print(f"stage {cfg.stage}: {final} exists, skipping")
        return final
    lock, run_id = checkpoint.claim_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    try:
        return _train_stage(cfg, d, lock, run_id)
    finally:
        if lock:
            lock.release()


def _train_stage(cfg: TrainConfig, d: Dist, lock, run_id):
    """The training loop: each pass gathers one optimizer step's micro-batches, takes the step, logs it
    and saves a checkpoint when one is due."""
    s = setup_stage(cfg, d, lock, run_id)
    progress = metrics.Progress(s, resolve_dtype(cfg, d))
    it = None
    while s.step < s.total:
        # one optimizer step: gather its micro-batches first, so the loss can be normalised by
        # the number of positions in the whole step, over all micro-batches and ranks (docs/method.md §Normalisation)
        # each epoch is exactly steps_per_epoch steps, so a step number fixes the data position
        if it is None or s.step % s.steps_per_epoch == 0:
            pos = s.data_pos or data_position(s.step, s.steps_per_epoch, cfg)  # a resumed run: the saved position
            s.data_pos = None
            it = batches(s.dataset, cfg, d, s.tok, pos["epoch"], pos["samples_in_epoch"] // d.world,
                         s.plain.cfg.image_token_id)
        micro = [next(it) for _ in range(s.accum)]
        lr = lr_at(s.step, s.total, cfg)
        log_lm, log_vm, grad_norm = optimizer_step(s, micro, lr, progress)
        s.step += 1
        s.ckptr.poll()
        progress.log_step(s, lr, log_lm, log_vm, grad_norm)
        stop = cfg.stop_at and s.step == cfg.stop_at and s.step < s.total
        if (cfg.save_every and s.step % cfg.save_every == 0 and s.step < s.total) or stop:
            save_step(s)
        if stop:
            s.ckptr.close()
            if d.main:
                print(f"stage {cfg.stage}: stopped at step {s.step} as asked (stop_at); continue with --resume")
            return None
    progress.close()
    return finish_stage(s)


@dataclass
class Stage:
    """What one stage trains with (built by setup_stage), and where it stands."""
    cfg: TrainConfig
    d: Dist
    tok: object
    tok_file: str
    plain: VTLMM                    # the model before wrapping: its config, FLOP and parameter counts
    model: torch.nn.Module          # as trained: blocks maybe compiled, maybe sharded by FSDP2
    objective: losses.Objective     # the stage's loss, holding `model`: what a micro-step calls (FSDP2's root)
    dataset: object
    params: list                    # the trained parameters (the optimizer's and the gradient clip's)
    optimizer: torch.optim.Optimizer
    accum: int                      # micro-batches per optimizer step on each process
    steps_per_epoch: int
    total: int                      # optimizer steps of the stage
    fingerprint: dict
    run_id: str
    ckptr: Optional[checkpoint.Checkpointer] = None
    amp: object = contextlib.nullcontext  # each forward's context: autocast to bf16 without FSDP
    step: int = 0                   # optimizer steps taken
    skipped: int = 0                # non-finite steps skipped (no update), in all ...
    bad_in_row: int = 0             # ... and in a row, now
    data_pos: Optional[dict] = None  # a resumed run's saved data position, until its first batch

    def flops_per_token(self, T):
        # 6N FLOPs per token when the decoder's weights train; 4N when only gradients pass through it
        # (stage I trains the adapter below it); 2N when it runs forward only (stage III)
        return {1: 4 / 6, 3: 2 / 6}.get(self.cfg.stage, 1.0) * self.plain.flops_per_token(T)


def setup_stage(cfg: TrainConfig, d: Dist, lock, run_id) -> Stage:
    """Seeds, the hook's data, tokenizer, model, dataset, the model parallelised, the optimizer, the
    schedule's length, and a resumed run's state (checkpoint.resume)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    hook = load_hook(cfg)
    if hook and d.main:
        hook.prepare_data(cfg)
    if d.world > 1:
        dist.barrier()

    tok, tok_file = find_tokenizer(cfg)
    sources = weights.ShardSources() if sharded_loading(cfg, d) else None
    model = build_model(cfg, tok, sources=sources)  # sharded loading: on meta until after parallelize
    if tok.vocab_size > model.cfg.decoder.vocab_size:
        raise InputError(f"tokenizer {tok_file} has {tok.vocab_size} tokens, the model's vocabulary only "
                         f"{model.cfg.decoder.vocab_size}")
    if hook and not (cfg.resume and checkpoint.latest(cfg.out_dir)):  # resumed: the checkpoint has it
        hook.prepare_model(cfg, model, d)
    name = STAGES[cfg.stage]["objective"]
    objective = losses.Objective(model, "lm" if name == "mm" and not cfg.vm_loss else name, cfg.loss_chunk or None,
                                 fused=cfg.fused_loss)
    trainable = set_trainable(model, cfg.stage, cfg.freeze)
    dataset = build_dataset(cfg, model, tok)
    plain = model  # bound before wrapping: parameter counts stay unsharded
    n_trainable = sum(model.get_parameter(n).numel() for n in trainable)
    model, fsdp = parallelize(model, cfg, d, root=objective)
    if sources is not None:
        load_sharded(model, sources, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, d.device)
    accum, steps_per_epoch, total = schedule_length(cfg, d, len(dataset))
    s = Stage(cfg, d, tok, tok_file, plain, model, objective, dataset, params, optimizer, accum,
              steps_per_epoch, total, run_fingerprint(cfg, model, dataset, total), run_id)

    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.resume(cfg.out_dir, model, optimizer, s.fingerprint, cfg.allow_resume_changes)
    if ckpt:
        s.step, s.data_pos, s.skipped = ckpt[1]["step"], ckpt[1]["data"], ckpt[1].get("skipped", 0)
        s.run_id = ckpt[1].get("run_id", run_id)  # the same run goes on: its checkpoints stay its own
    s.ckptr = checkpoint.Checkpointer(cfg.out_dir, s.run_id, cfg.keep_checkpoints, cfg.async_save, lock)
    if d.main:
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
        print(f"stage {cfg.stage} ({objective.name}): {len(dataset)} samples, {total} steps of {cfg.global_batch} "
              f"({cfg.micro_batch} x {d.world} processes x {accum} accumulation), trains {len(trainable)} "
              f"tensors / {n_trainable:,} parameters"
              + (f", resumed at step {s.step}" if ckpt else "")
              + (f"; data as read: {dataset.report()}" if dataset.skipped or dataset.repaired else ""))
    if resolve_dtype(cfg, d) == "bf16" and not fsdp:
        s.amp = lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)
    return s


def schedule_length(cfg: TrainConfig, d: Dist, n_samples):
    """(micro-batches per step on each process, steps per epoch, total steps) for n_samples samples."""
    per_step = cfg.micro_batch * d.world
    if cfg.global_batch % per_step:
        raise InputError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x processes = {per_step}")
    steps_per_epoch = n_samples // cfg.global_batch
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.data_path}: {n_samples} samples, fewer than one global batch ({cfg.global_batch})")
    total = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return cfg.global_batch // per_step, steps_per_epoch, total


def optimizer_step(s: Stage, micro, lr, progress):
    """One optimizer step on this process's micro-batches: forward and backward of each (the loss
    divided by the step's position counts over all ranks), the gradient clipped, then the update, or
    none when the step is not finite. Returns the step's (lm, vm) losses and its gradient norm."""
    cfg, d = s.cfg, s.d
    for b in micro:  # skips made in DataLoader workers are counted here, in the main process
        s.dataset.note_skipped(b["skipped"])
    # the counts come from the CPU batches (losses.Rows, built by the loader): the device never
    # has to report them back, and the host can run ahead of it
    counts = torch.tensor([[b["rows"].lm.numel(), b["rows"].vm.numel()] for b in micro],
                          dtype=torch.float64).sum(0)
    if d.world > 1:  # stays on the device: the loss divides by it there
        counts = counts.to(d.device)
        dist.all_reduce(counts)
        # FSDP averages gradients over ranks: scale by world so the result is sum / count
        lm_count, vm_count = (counts / d.world).float()
    else:
        lm_count, vm_count = counts.tolist()
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    step_loss = torch.zeros(2, device=d.device)  # (lm, vm) of this step, stays on the device
    for b in micro:
        with s.amp():
            loss, lm, vm = s.objective(_to(b["input_ids"], d.device), _to(b["pixel_values"], d.device),
                                       _to(b["labels"], d.device), b["rows"].to(d.device), lm_count, vm_count)
        loss.backward()
        step_loss += torch.stack([lm.detach(), vm.detach()]).float()
        progress.count(*real_tokens_and_flops(b["attention_mask"], s.flops_per_token))
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # the step's one host sync (none per micro-batch): the losses and the gradient norm, reduced over
    # the ranks, decide together whether the update is applied
    check = torch.cat([step_loss, grad_norm.detach().float().reshape(1).to(step_loss.device)])
    if d.world > 1:
        dist.all_reduce(check)
    log_lm, log_vm, norm_sum = (check / d.world).tolist()
    grad_norm = float(grad_norm)
    if math.isfinite(log_lm + log_vm + norm_sum):
        s.optimizer.step()
        s.bad_in_row = 0
    else:
        skip_step(s, log_lm, log_vm, grad_norm)
    s.optimizer.zero_grad(set_to_none=True)
    return log_lm, log_vm, grad_norm


def skip_step(s: Stage, log_lm, log_vm, grad_norm):
    """Never apply (or save) a non-finite update: skip it, or stop after too many in a row."""
    s.skipped += 1
    s.bad_in_row += 1
    if s.bad_in_row > s.cfg.max_skipped_steps:
        s.ckptr.wait()
        raise FloatingPointError(f"stage {s.cfg.stage}: loss {log_lm + log_vm} (lm {log_lm}, vm {log_vm}), "
                                 f"gradient norm {grad_norm} at step {s.step + 1}, {s.bad_in_row} "
                                 f"non-finite step(s) in a row; stopping. The last good checkpoint is "
                                 f"{checkpoint.latest(s.cfg.out_dir)}")
    if s.d.main:
        print(f"warning: step {s.step + 1}: loss {log_lm + log_vm}, gradient norm {grad_norm}; "
              f"skipped (no update), {s.skipped} so far")


def save_step(s: Stage):
    """A step checkpoint: model, optimizer, and what a resumed run checks and starts from."""
    cfg = s.cfg
    s.ckptr.save(s.step, s.model, s.optimizer, {
        "total": s.total, "data": data_position(s.step, s.steps_per_epoch, cfg), "skipped": s.skipped,
        "fingerprint": s.fingerprint, "stage": cfg.stage, "config": dataclasses.asdict(cfg)})


def finish_stage(s: Stage):
    """The last step taken: the final model (checkpoint.save_final) and the data report."""
    cfg, d = s.cfg, s.d
    final = os.path.join(cfg.out_dir, "final")
    s.ckptr.close()
    checkpoint.save_final(final, s.model, s.plain.cfg.to_dict(), s.tok_file, cfg.final_dtype,
                          {"run_id": s.run_id, "stage": cfg.stage, "step": s.step, "skipped": s.skipped},
                          timeout_s=60 * cfg.dist_timeout_min)
    report = data_report(s.dataset, d)
    if d.main:
        print(f"stage {cfg.stage}: done, {s.step} steps -> {final}; data: {report}")
        with open(os.path.join(cfg.out_dir, "data_report.json"), "w") as f:
            json.dump({"report": report, "skipped": dict(s.dataset.skipped), "repaired": dict(s.dataset.repaired),
                       "missing": s.dataset.missing}, f, indent=1)
    return final


def _to(x, device):
    """To the device; from pinned memory (the loader pins on GPUs) the copy does not block the host."""
    return x.to(device, non_blocking=True) if x is not None else None


def real_tokens_and_flops(attention_mask, flops_per_token):
    """Non-padding tokens of a CPU batch and their training FLOPs (each sample at its own length):
    what tokens/s and MFU count, so that padding never reads as throughput."""
    lengths = attention_mask.sum(1).tolist()
    return sum(lengths), sum(flops_per_token(n) * n for n in lengths)


def run(cfg: TrainConfig):
    """Train the config's stage, or its list of stages one after the other (each starting from the
    previous one's final model). Returns the last final/ directory, or None when stopped early."""
    d = setup_distributed(cfg)
    final = run_stages(cfg, d)
    # Only after success: on an error this process exits and torchrun stops the others (a rank that
    # tears down its process group while the others still wait in a collective can hang them).
    if d.world > 1 and dist.is_initialized():
        shutdown_distributed()
    return final


def run_stages(cfg: TrainConfig, d: Dist):
    if not cfg.stages:
        return train_stage(cfg, d)
    prev = None
    base = dataclasses.replace(cfg, stages=[])
    for over in cfg.stages:
        over = dict(over)
        over.setdefault("out_dir", os.path.join(cfg.out_dir, f"stage{over.get('stage', cfg.stage)}"))
        if prev and "init_from" not in over:
            over["init_from"] = prev
        prev = train_stage(dataclasses.replace(base, **over), d)
        if prev is None:  # stopped early (stop_at): the next stages wait for --resume
            return None
    hook = load_hook(cfg)
    if hook and d.main:
        hook.after_run(cfg, prev)
    return prev


def shutdown_distributed():
    """The end of a multi-process run: free the stages' sharded modules and optimizers (they hold the
    process group) while the interpreter is still whole, wait until every rank is done, then destroy
    the process group. Tearing down gloo with work or references still alive at interpreter exit can
    abort a process that has finished its work."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    """The command: one line and exit status 1 for a user's error (errors.one_line: a bad config,
    tokenizer or data file, a refused --resume, a read-only or full disk); a programming error keeps its
    traceback."""
    try:
        return run(load_config(sys.argv[1:] if argv is None else argv))
    except (InputError, OSError) as e:
        line = errors.one_line(e)
        if line is None:
            raise
        sys.exit(f"train.py: {line}")


if __name__ == "__main__":
    main()
