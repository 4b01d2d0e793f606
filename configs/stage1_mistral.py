# Stage I (docs/method.md §Stages): align the adapter on LCS-558K captions, plain template, LM loss (Eq. 4).
#   torchrun --nproc_per_node=8 train.py configs/stage1_mistral.py
# global batch 256 = 32 per GPU x 8 GPUs x 1 accumulation step
stage = 1
clip_path = "weights/clip-vit-large-patch14-336"
llm_path = "weights/Mistral-7B-Instruct-v0.2"
data_path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = "data/LLaVA-Pretrain/images"
out_dir = "out/mistral/stage1"
global_batch = 256
micro_batch = 32
lr = 1e-3
max_len = 2048
save_every = 500
final_dtype = "bf16"        # final/ in bf16 (the released weights' precision); training state stays fp32
