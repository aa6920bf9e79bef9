"""One rank of a real multi-process training run (launched by torchrun or mpiexec in the tests).

Each rank starts from different weights (seeded by its rank) and reads its own shard of the photos,
trains a few steps, then writes its parameters, EMA, sampler state and what it saw to OUT/rank<r>.pt.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_rcdm import dist_util, logger  # noqa: E402
from guided_diffusion_rcdm.feature_cache import prepare_feature_cache  # noqa: E402
from guided_diffusion_rcdm.get_ssl_models import get_model  # noqa: E402
from guided_diffusion_rcdm.image_datasets import find_images, load_data  # noqa: E402
from guided_diffusion_rcdm.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402
from guided_diffusion_rcdm.train_util import TrainLoop, conditioned_batches  # noqa: E402


def main(data_dir: str, out: str, steps: int) -> None:
    info = dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=out, format_strs="log,csv")
    torch.manual_seed(rank)
    np.random.seed(rank)
    flags = {**model_and_diffusion_defaults(), **dict(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="16", learn_sigma=True, diffusion_steps=100)}
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=512)
    encoder = get_model("resnet18", use_head=False, pretrained=False).to(dist_util.dev())
    # the ranks share the work of a feature cache (this run then trains with the live encoder)
    enc_info = {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one", "pretrained": False}
    cache_paths, cache_feats = prepare_feature_cache(
        os.path.join(out, "cache"), data_dir, find_images(data_dir), enc_info, lambda: encoder, batch_size=2)
    seen = []

    def batches():
        stream = load_data(data_dir=data_dir, batch_size=2, image_size=32, num_workers=0)
        for images, cond in conditioned_batches(stream, encoder, dist_util.dev()):
            seen.append(images.clone())
            yield images, cond

    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    loop = TrainLoop(model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=1,
                     lr=1e-3, ema_rate="0.9", log_interval=steps, save_interval=steps,
                     resume_checkpoint="", schedule_sampler=sampler, max_steps=steps, progress=False)
    loop.run_loop()
    torch.save({
        "launcher": info.launcher, "world_size": dist_util.get_world_size(), "step": loop.step,
        "params": [p.detach().clone() for p in model.parameters()],
        "ema": [p.clone() for p in loop.ema_params[0]],
        "loss_counts": torch.from_numpy(sampler._loss_counts.copy()),
        "seen": torch.cat(seen),
        "cache_paths": cache_paths,
        "cache_feats": torch.stack([cache_feats[i, f] for i in range(len(cache_paths)) for f in (0, 1)]),
    }, os.path.join(out, f"rank{rank}.pt"))
    dist_util.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
