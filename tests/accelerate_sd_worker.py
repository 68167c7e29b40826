"""One rank of tests/test_sd_methods.py's accelerate test: DRaFT-1 LoRA training on the tiny SD pipeline, 2 steps.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_sd_worker.py OUT_DIR

Writes OUT_DIR/rank{r}.pt (the LoRA weights after training) and rank{r}.json (process count, rewards seen).
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from minialign.sd import add_lora, tiny_pipeline
from minialign.rewards.image import brightness
from minialign.sd.build import build_sd
from minialign.train import TrainConfig, train


def main(out: Path):
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    pipe = tiny_pipeline(seed=0)  # the same weights on every rank
    pipe.vae.requires_grad_(False)
    add_lora(pipe)
    den, loss_fn, _ = build_sd("draft_1", pipe, brightness(), ["a red digit seven", "a blue digit one"],
                               guidance_scale=2.0, batch=2, n_steps=4)
    hist = train(den, loss_fn, TrainConfig(steps=2, lr=1e-2, batch=2, progress=False), accelerator=acc)
    lora = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    r = acc.process_index
    torch.save(lora, out / f"rank{r}.pt")
    (out / f"rank{r}.json").write_text(json.dumps({"num_processes": acc.num_processes,
                                                   "rewards": [row["reward"] for row in hist]}))
    acc.wait_for_everyone()  # join gloo's threads before exit, or a rank can abort after its work passed
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
