# Stage IV (docs/method.md §Stages): visual modeling. llava_v1_5_mix665k again, MM loss = LM + VM (Eq. 7):
# the VM head's visual-token distributions are the targets at image positions (Eq. 6).
# Trains decoder and MM head; adapter and VM head frozen; FSDP2 full sharding.
#   torchrun --nproc_per_node=8 train.py configs/stage4_vicuna.py
# global batch 128 = 16 per GPU x 8 GPUs x 1 accumulation step
stage = 4
init_from = "out/vicuna/stage3/final"
tokenizer = "weights/vicuna-7b-v1.5"
data_path = "data/llava_mix665k/llava_v1_5_mix665k.json"
image_folder = "data/llava_mix665k"
out_dir = "out/vicuna/stage4"
global_batch = 128
micro_batch = 16
lr = 2e-5
max_len = 2048
save_every = 500
final_dtype = "bf16"        # final/ in bf16 (the released weights' precision); training state stays fp32
