# Stage III (docs/method.md §Stages): fit the VM head to the frozen stage-II model on the LCS-558K images
# (BOS + image patches, no text), VM-fit loss (Eq. 9). Only the VM head trains.
#   torchrun --nproc_per_node=8 train.py configs/stage3_mistral.py
# To start from a released LLaVA-1.5 instead: --init_from=weights/llava-1.5-7b-hf
# global batch 256 = 32 per GPU x 8 GPUs x 1 accumulation step
stage = 3
init_from = "out/mistral/stage2/final"
tokenizer = "weights/Mistral-7B-Instruct-v0.2"
data_path = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
image_folder = "data/LLaVA-Pretrain/images"
out_dir = "out/mistral/stage3"
global_batch = 256
micro_batch = 32
lr = 1e-3
max_len = 2048
save_every = 500
final_dtype = "bf16"        # final/ in bf16 (the released weights' precision); training state stays fp32
