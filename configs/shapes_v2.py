# LEGACY: an older recipe, kept so that the numbers docs/experiments.md reports for it can be rerun; the demo is configs/shapes.py.
# The demo until issue 19: the whole VT-LMM recipe on the synthetic shapes world version 2, on 2 CPU cores
# (56.5% held-out short answers, 80.0% POPE in 16.7 min; docs/experiments.md §The shapes demo, version 2).
# The demo is now configs/shapes.py, on world version 3.
#   python train.py configs/shapes_v2.py
# No pretrained CLIP or LLM can be downloaded here, so a toy stage 0 stands in for them: the vision
# tower first learns what each cell of the world's 3x3 grid holds (a supervised stand-in for CLIP's
# pretraining, shapes.pretrain_vision), then, with the tower frozen, the decoder, adapter and MM head
# learn language and looking from the instruction data. Then the adapter and VM head start afresh and
# stages I-IV run as in the paper (docs/method.md §Stages); the held-out sets are scored at the end.
# shapes.py does the toy's part (the world, stage 0's vision pretraining, the report): train.py calls it
# through `hook`, whose entries are shapes.ShapesConfig's fields.
hook = dict(module="shapes", dir="data/shapes_v2", version=2, images=10000, image_size=48,
            vision_epochs=12, vision_lr=2e-3,  # stage 0 only
            report=True, report_limit=0,       # after stage IV: all 1,000 short-answer and 3,000 POPE questions
            report_sets=("held-out",), naming_images=0)
tokenizer = "data/shapes_v2/tokenizer.model"
out_dir = "out/shapes_v2"
# 16-pixel patches: one patch per cell of the 3x3 grid, 9 image tokens per picture
model = dict(vision=dict(image_size=48, patch_size=16, width=128, layers=3, heads=4, mlp=256),
             decoder=dict(dim=192, layers=4, heads=6, kv_heads=6, hidden=512, max_seq_len=512),
             template="vicuna_v1")
max_len = 320
micro_batch = 32
global_batch = 32          # one process, no accumulation: 32 samples per step
log_every = 25
save_every = 100
activation_checkpointing = False
_captions = "data/shapes_v2/stage1_captions.json"
_instruct = "data/shapes_v2/instruct.json"
stages = [
    dict(stage=0, out_dir="out/shapes_v2/stage0", data_path=_instruct, template="vicuna_v1", lr=1e-3,
         warmup_ratio=0.1, epochs=1.25, freeze=("vision",)),
    dict(stage=1, out_dir="out/shapes_v2/stage1", data_path=_captions, reinit=("adapter", "vm_head"), lr=2e-3,
         epochs=0.5),
    dict(stage=2, out_dir="out/shapes_v2/stage2", data_path=_instruct, lr=1e-3, epochs=1),
    dict(stage=3, out_dir="out/shapes_v2/stage3", data_path=_captions, lr=2e-3, epochs=0.5),
    dict(stage=4, out_dir="out/shapes_v2/stage4", data_path=_instruct, lr=5e-4, epochs=1),
]
