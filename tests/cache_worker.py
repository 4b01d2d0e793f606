"""Run by tests/test_data_cache.py under torchrun (2 gloo processes): train.build_dataset with the
read cache; every read of the JSON is recorded, and each rank writes what it got."""

import json
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from conversation import IMAGE_TOKEN_ID
from tokenizer import load_tokenizer


def main(json_path, image_folder, tokenizer, out_dir, result_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    read_json = data.read_json

    def counted(path):  # one line per read, appended by whichever process reads
        with open(os.path.join(result_dir, "reads.txt"), "a") as f:
            f.write(f"{rank}\n")
        return read_json(path)

    data.read_json = counted
    cfg = train.TrainConfig(stage=2, out_dir=out_dir, data_path=json_path, image_folder=image_folder,
                            template="vicuna_v1", max_len=200)
    model = SimpleNamespace(cfg=SimpleNamespace(vision=SimpleNamespace(image_size=32, num_patches=4),
                                                image_token_id=IMAGE_TOKEN_ID))
    ds = train.build_dataset(cfg, model, load_tokenizer(tokenizer))
    got = {"samples": list(ds.samples), "modality_lengths": list(ds.modality_lengths), "lengths": list(ds.lengths),
           "report": ds.report(), "from_cache": ds.from_cache, "mapped": ds.samples._paths is not None,
           "item0": ds[0]["input_ids"].tolist()}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(got, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
