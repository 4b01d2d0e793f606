"""The loader feeds a real batch of the shapes world into the model and the losses (stages I-IV)."""

import torch

import data
import losses
import shapes
from conversation import IMAGE_TOKEN_ID
from model import VTLMM, DecoderConfig, VisionConfig, VTLMMConfig
from tokenizer import load_tokenizer


def test_shapes_batch_through_model_and_losses(tmp_path):
    shapes.make_shapes_world(tmp_path, n_images=64, vocab_size=600, workers=1)
    tok = load_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = VTLMM(VTLMMConfig(vision=VisionConfig(image_size=64, patch_size=8, width=32, layers=2, heads=2, mlp=64),
                              decoder=DecoderConfig(vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2,
                                                    hidden=64),
                              image_token_id=IMAGE_TOKEN_ID))
    num_patches = model.cfg.vision.num_patches  # 64 = (64 / 8)^2
    stages = {  # stage: (dataset, loss)
        "I": data.LlavaDataset(tmp_path / "stage1_captions.json", None, tok, "plain", 64, num_patches),
        "II": data.LlavaDataset(tmp_path / "instruct.json", None, tok, "vicuna_v1", 64, num_patches),
        "III": data.ImageOnlyDataset(tmp_path / "stage1_captions.json", tok, 64, num_patches),
        "IV": data.LlavaDataset(tmp_path / "instruct.json", None, tok, "mistral_instruct", 64, num_patches),
    }
    for stage, ds in stages.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=data.make_sampler(ds, 4, seed=1),
                                             collate_fn=lambda s: data.collate(s, tok.pad_id))
        batch = next(iter(loader))
        out = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        visual = model.vm_head(out.image_features) if out.image_features is not None else None
        image_mask = batch["input_ids"] == IMAGE_TOKEN_ID
        assert out.logits.shape == (*batch["input_ids"].shape, tok.vocab_size)
        assert torch.equal(out.image_mask, image_mask)
        if stage == "III":
            loss = losses.vm_fit_loss(out.logits, visual, image_mask)
        elif stage == "IV" and visual is not None:
            loss = losses.mm_loss(out.logits, batch["labels"], visual, image_mask)[0]
        else:
            loss = losses.lm_loss(out.logits, batch["labels"])
        assert torch.isfinite(loss) and loss > 0, stage
        loss.backward()
        model.zero_grad(set_to_none=True)
