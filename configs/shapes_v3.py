# LEGACY: an older recipe, kept so that the numbers docs/experiments.md reports for it can be rerun; the demo is configs/shapes.py.
# World version 3 (issue 14): the whole VT-LMM recipe on a shapes world whose patches can be
# predicted in raster order, so that visual tokens can name what they show.
#   python train.py configs/shapes_v3.py
# 17.5 min on 2 cores: 67.6% short answers, 55.3% POPE. The demo (configs/shapes.py) is this recipe
# with every stage's epochs x 4 (as configs/shapes_v3_long.py is, on this world's own copy),
# configs/shapes_x2.py x 2 (docs/experiments.md §The demo's budget).
# No pretrained CLIP or LLM can be downloaded here, so a toy stage 0 stands in for them, in three
# steps: the vision tower first learns what each patch shows (a supervised stand-in for CLIP's
# pretraining, shapes.pretrain_vision); then, with the tower frozen, the decoder, adapter and MM head
# learn to caption images (plain template: image, then a caption whose first words name the last
# object in raster order, shapes.caption_v3), and then to answer the instruction data. Captioning is
# what makes the MM head's predictions inside an image name what the patches show, as a pretrained
# LLM's carry content: stage III fits the VM head to them (docs/experiments.md §World version 3).
# Then the adapter and VM head start afresh and stages I-IV run as in the paper (docs/method.md
# §Stages); the held-out sets and the visual tokens are scored at the end. shapes.py does the toy's
# part (the world, stage 0's vision pretraining, the report): train.py calls it through `hook`, whose
# entries are shapes.ShapesConfig's fields.
hook = dict(module="shapes", dir="data/shapes_v3", version=3, images=10000, image_size=48,
            vision_epochs=4, vision_lr=2e-3,   # stage 0 only
            report=True, report_limit=0,       # after stage IV: all 1,000 short-answer and 3,000 POPE questions
            naming_images=100)                 # and the visual tokens of 100 held-out images
tokenizer = "data/shapes_v3/tokenizer.model"
out_dir = "out/shapes_v3"
# 8-pixel patches: 6 x 6 image tokens per picture, each shape covers the 2 x 2 patches of its cell
model = dict(vision=dict(image_size=48, patch_size=8, width=128, layers=3, heads=4, mlp=256),
             decoder=dict(dim=192, layers=4, heads=6, kv_heads=6, hidden=512, max_seq_len=512),
             template="vicuna_v1")
max_len = 320
micro_batch = 32
global_batch = 32          # one process, no accumulation: 32 samples per step
log_every = 25
save_every = 100
activation_checkpointing = False
_captions = "data/shapes_v3/stage1_captions.json"
_instruct = "data/shapes_v3/instruct.json"
stages = [
    # toy stage 0 (stand-in for pretrained CLIP and LLM): vision pretraining, captioning, instructions
    dict(stage=0, out_dir="out/shapes_v3/stage0_captions", data_path=_captions, template="plain", lr=2e-3,
         warmup_ratio=0.1, epochs=1, freeze=("vision",)),
    dict(stage=0, out_dir="out/shapes_v3/stage0", data_path=_instruct, template="vicuna_v1", lr=1e-3,
         warmup_ratio=0.1, epochs=1.25, freeze=("vision",)),
    # the paper's stages I-IV
    dict(stage=1, out_dir="out/shapes_v3/stage1", data_path=_captions, reinit=("adapter", "vm_head"), lr=2e-3,
         epochs=0.5),
    dict(stage=2, out_dir="out/shapes_v3/stage2", data_path=_instruct, lr=1e-3, epochs=1),
    dict(stage=3, out_dir="out/shapes_v3/stage3", data_path=_captions, lr=2e-3, epochs=0.5),
    dict(stage=4, out_dir="out/shapes_v3/stage4", data_path=_instruct, lr=5e-4, epochs=1),
]
