# Stage II (docs/method.md §Stages): instruction tuning on llava_v1_5_mix665k, mistral_instruct template,
# LM loss (Eq. 4). Trains decoder, MM head and adapter; FSDP2 full sharding.
#   torchrun --nproc_per_node=8 train.py configs/stage2_mistral.py
# global batch 128 = 16 per GPU x 8 GPUs x 1 accumulation step
stage = 2
init_from = "out/mistral/stage1/final"
tokenizer = "weights/Mistral-7B-Instruct-v0.2"
data_path = "data/llava_mix665k/llava_v1_5_mix665k.json"
image_folder = "data/llava_mix665k"   # holds coco/, gqa/, ocr_vqa/, textvqa/, vg/
out_dir = "out/mistral/stage2"
global_batch = 128
micro_batch = 16
lr = 2e-5
max_len = 2048
save_every = 500
final_dtype = "bf16"        # final/ in bf16 (the released weights' precision); training state stays fp32
