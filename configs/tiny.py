# A few seconds on one CPU: a tiny random model on a small shapes world. Tests use it.
hook = dict(module="shapes", dir="data/shapes-tiny", images=240, image_size=32)  # builds the world first
tokenizer = "data/shapes-tiny/tokenizer.model"
data_path = "data/shapes-tiny/instruct.json"
out_dir = "out/tiny"
model = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),  # 16 patches
             decoder=dict(dim=64, layers=2, heads=4, kv_heads=2, hidden=128, max_seq_len=256),
             template="vicuna_v1")
stage = 2
max_len = 256
global_batch = 16          # 4 per micro-batch x 4 accumulation steps on one process
micro_batch = 4
lr = 3e-3
max_steps = 8
log_every = 2
save_every = 4
activation_checkpointing = False
