"""Run under torchrun by tests/test_multinode.py (not a test module): train the tiny DiT or an
autoencoder stage on in-memory data, each rank its rows of the global batch.

    torchrun ... tests/torchrun_worker.py dit|ae1|ae2 OUT MICRO [INIT]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ae_stages, tiny_config  # noqa: E402
from test_dit import FakeCache  # noqa: E402
from test_train_ae import images, make_batches, small_config  # noqa: E402

from dinosae.train import dit as TD  # noqa: E402
from dinosae.train.ae import train_stage  # noqa: E402


def dit_config(micro: int | None) -> dict:
    cfg = tiny_config()
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=3, batch_size=8, ckpt_every=100, log_every=1, image_every=100,
                      warmup_steps=1, micro_batch=micro)
    return {k: cfg[k] for k in ("seed", "device", "dit", "sample")}


def ae_config(micro: int | None) -> dict:
    cfg = small_config()
    cfg["ae_train"].update(stages=ae_stages([2, 3, 1, 1], 8, cfg["ae_train"]["stages"][0]["lr"]),
                           disc_warmup_steps=1,
                           ckpt_every=100, image_every=100, micro_batch=micro)
    return cfg


def main() -> None:
    import os

    torch.set_num_threads(1)
    mode, out, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if mode == "dit":
        TD.train_dit(dit_config(micro), FakeCache(), None, out)
    else:
        stage = int(mode[2:])
        train_stage(ae_config(micro), stage, None, init=sys.argv[4] if stage > 1 else None,
                    out=out, batches=make_batches(images(), 8, rank=rank, world=world))


if __name__ == "__main__":
    main()
