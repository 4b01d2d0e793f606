# Table 5's ablation on the shapes world (ablate.py), sized for 3 seeds x 4 variants on 2 CPU cores:
#   python ablate.py                    (= python ablate.py configs/ablate.py --seeds=0,1,2)
# configs/shapes.py's model and schedule on a smaller world: 48 px images in 8 px patches (6 x 6 = 36
# patches, 2 x 2 per cell of the world's 3 x 3 grid) instead of 64 px / 64 patches, 4000 images instead
# of 10000 (3800 for training, 200 held out: 1200 POPE and 400 short-answer questions), batches of 16.
shapes_dir = "data/shapes-ablate"
shapes_images = 4000
out_dir = "out/ablate"
model = dict(vision=dict(image_size=48, patch_size=8, width=128, layers=4, heads=4, mlp=256),  # 36 patches
             decoder=dict(dim=192, layers=4, heads=6, kv_heads=2, hidden=512, max_seq_len=512),
             template="vicuna_v1")
max_len = 320
micro_batch = 16
global_batch = 16          # one process, no accumulation: 16 samples per step
log_every = 50
save_every = 100           # an interrupted stage resumes from its last 100 steps
activation_checkpointing = False
stages = [  # as configs/shapes.py: stage 0 (toy pretraining), then I-IV; ablate.py sets data and out_dir
    dict(stage=0, template="plain", lr=2e-3, epochs=1),
    dict(stage=1, reinit=("adapter", "vm_head"), lr=2e-3, epochs=0.5),
    dict(stage=2, lr=1e-3, epochs=1),
    dict(stage=3, lr=2e-3, epochs=0.5),
    dict(stage=4, lr=5e-4, epochs=1),
]
