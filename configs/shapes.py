# The demo: the whole VT-LMM recipe on the synthetic shapes world (version 3), on 2 CPU cores.
#   python train.py configs/shapes.py
# No pretrained CLIP or LLM can be downloaded here, so a toy stage 0 stands in for them, in three
# steps: the vision tower first learns what each patch shows (a supervised stand-in for CLIP's
# pretraining, shapes.pretrain_vision); then, with the tower frozen, the decoder, adapter and MM head
# learn to caption images (plain template: image, then a caption whose first words name the last
# object in raster order) and then to answer the instruction data. Captioning is what makes the MM
# head's predictions inside an image name what the patches show, as a pretrained LLM's carry content:
# stage III fits the VM head to them. Then the adapter and VM head start afresh and stages I-IV run as
# in the paper (docs/method.md §Stages). At the end the two held-out sets are answered, the visual
# tokens of 100 held-out images are scored, and out/shapes/results.md holds the table and a transcript.
# The recipe: configs/shapes_v3.py's with every stage's epochs x 4 (vision pretraining unchanged): the
# shortest recipe measured that reaches the demo's short-answer and POPE targets (85%, 90%). It trains
# in bf16 autocast with compiled blocks, 2.0x the tokens/s of float32 eager on a 2-core AMX Xeon
# (bench/results_demo_speed.md), which halves the hour it took in float32 (25 minutes from a fresh
# clone); configs/shapes_x3.py is three quarters of the epochs (20 minutes, fewer right short answers),
# configs/shapes_x2.py half of them in float32 (docs/experiments.md §The demo's budget).
# shapes.py does the toy's part (the world, stage 0's vision pretraining, the report): train.py calls
# it through `hook`, whose entries are shapes.ShapesConfig's fields.
hook = dict(module="shapes", dir="data/shapes", version=3, images=10000, image_size=48,
            vision_epochs=4, vision_lr=2e-3,   # stage 0 only
            report=True, report_limit=0,       # after stage IV: all short-answer and POPE questions of
            report_sets=("held-out", "held-out 2"),  # both held-out sets,
            naming_images=100,                 # the visual tokens of 100 held-out images
            transcript_images=3)               # and a transcript of three of them
tokenizer = "data/shapes/tokenizer.model"
out_dir = "out/shapes"
dtype = "bf16"             # CPU autocast: float32 weights, softmax and loss sums; attention in float32 (model.attend)
compile = True             # every decoder and vision block through torch.compile (needs a C++ compiler, else eager)
# 8-pixel patches: 6 x 6 image tokens per picture, each shape covers the 2 x 2 patches of its cell
model = dict(vision=dict(image_size=48, patch_size=8, width=128, layers=3, heads=4, mlp=256),
             decoder=dict(dim=192, layers=4, heads=6, kv_heads=6, hidden=512, max_seq_len=512),
             template="vicuna_v1")
max_len = 320
micro_batch = 32
global_batch = 32          # one process, no accumulation: 32 samples per step
log_every = 25
save_every = 200
activation_checkpointing = False
_captions = "data/shapes/stage1_captions.json"
_instruct = "data/shapes/instruct.json"
stages = [
    # toy stage 0 (stand-in for pretrained CLIP and LLM): vision pretraining, captioning, instructions
    dict(stage=0, out_dir="out/shapes/stage0_captions", data_path=_captions, template="plain", lr=2e-3,
         warmup_ratio=0.1, epochs=4, freeze=("vision",)),
    dict(stage=0, out_dir="out/shapes/stage0", data_path=_instruct, template="vicuna_v1", lr=1e-3,
         warmup_ratio=0.1, epochs=5, freeze=("vision",)),
    # the paper's stages I-IV
    dict(stage=1, out_dir="out/shapes/stage1", data_path=_captions, reinit=("adapter", "vm_head"), lr=2e-3,
         epochs=2),
    dict(stage=2, out_dir="out/shapes/stage2", data_path=_instruct, lr=1e-3, epochs=4),
    dict(stage=3, out_dir="out/shapes/stage3", data_path=_captions, lr=2e-3, epochs=2),
    dict(stage=4, out_dir="out/shapes/stage4", data_path=_instruct, lr=5e-4, epochs=4),
]
