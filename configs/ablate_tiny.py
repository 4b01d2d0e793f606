# The ablation in seconds (its end-to-end test): configs/tiny.py's model, 2 steps a stage, 12 questions a set.
#   python shapes_ablate.py --tiny --seeds=0
hook = dict(module="shapes", dir="data/shapes-ablate-tiny", images=240, image_size=32, report_limit=12)
out_dir = "out/ablate-tiny"
model = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),  # 16 patches
             decoder=dict(dim=64, layers=2, heads=4, kv_heads=2, hidden=128, max_seq_len=256),
             template="vicuna_v1")
max_len = 256
global_batch = 8           # one micro-batch of 8 per step
micro_batch = 8
max_steps = 2
log_every = 1
save_every = 0
activation_checkpointing = False
stages = [dict(stage=0, template="plain", lr=3e-3), dict(stage=1, reinit=("adapter", "vm_head"), lr=3e-3),
          dict(stage=2, lr=3e-3), dict(stage=3, lr=3e-3), dict(stage=4, lr=3e-3)]
