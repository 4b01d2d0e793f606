# bench/gpu.sh's 1B-class run: TinyLlama-1.1B decoder shapes with CLIP ViT-L/14-336, random weights,
# bf16 + FSDP2 (one process), on the tiny shapes world's instruction data (images resized to 336 px:
# 576 patches per image, so sequences are ~600-700 tokens).
hook = dict(module="shapes", dir="data/shapes-tiny", images=240, image_size=32)  # the tiny world (configs/tiny.py's)
tokenizer = "data/shapes-tiny/tokenizer.model"
data_path = "data/shapes-tiny/instruct.json"
out_dir = "out/gpu-1b"
model = dict(vision=dict(),  # CLIP ViT-L/14-336 shapes (model.PRESETS["clip-vit-l14-336"])
             decoder=dict(vocab_size=32000, dim=2048, layers=22, heads=32, kv_heads=4, hidden=5632,
                          max_seq_len=2048),
             template="vicuna_v1")
stage = 2
max_len = 2048
global_batch = 32          # 8 per micro-batch x 4 accumulation steps on one GPU
micro_batch = 8
lr = 2e-5
max_steps = 12
log_every = 4
save_every = 0
fsdp = "on"
dtype = "bf16"
