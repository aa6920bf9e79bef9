"""Test helpers for checkpoint files: a real HTTP server on 127.0.0.1 and upstream-layout files.

The files are written in exactly the nesting and key names of the published upstream checkpoints
(`reference/ssl_checkpoint_layouts.json`, `reference/pretrained_128_keys.json`), with random
weights and the training state those files carry (optimizer, epoch, argparse arguments, numpy
scalars). Tensors of 4M+ elements are stored as one random row broadcast to the full shape: same
keys, shapes and dtype as upstream, hundreds of MB less to write and serve (the RCDM file
does this from 64K elements on).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import math
import socket
import threading
from pathlib import Path

import numpy as np
import torch

REFERENCE_DIR = Path(__file__).parent / "reference"
BIG = 4_000_000


def layouts() -> dict:
    return json.loads((REFERENCE_DIR / "ssl_checkpoint_layouts.json").read_text())


def random_tensor(name: str, shape: list[int], gen: torch.Generator,
                  big: int = BIG) -> torch.Tensor:
    if name.endswith("num_batches_tracked"):
        return torch.randint(0, 1000, (), generator=gen, dtype=torch.long)
    # Scaled like a trained network (fan-in for matrices, ~1 for norm gains) so that a forward
    # pass through 50 random layers stays finite.
    scale = math.prod(shape[1:]) ** -0.5 if len(shape) >= 2 else 0.1
    if math.prod(shape) >= big:
        return (torch.randn(shape[-1], generator=gen) * scale).expand(*shape)
    t = torch.randn(shape, generator=gen) * scale
    if name.endswith("running_var") or (len(shape) == 1 and name.endswith(".weight")):
        return t.abs() + 1.0
    return t


def random_state(shapes: dict[str, list[int]], seed: int,
                 big: int = BIG) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen, big) for k, s in shapes.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _training_state(seed: int) -> dict:
    # What the upstream files hold next to the weights, numpy scalars included.
    return {
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(4)}},
                      "param_groups": [{"lr": np.float64(0.3), "weight_decay": 1e-6,
                                        "params": [0]}]},
        "epoch": 1000,
        "loss_value": np.float32(0.25),
        "seed": np.int64(seed),
    }


def write_upstream_file(name: str, directory: Path, seed: int = 0,
                        dino_weight_norm: bool = True) -> tuple[Path, dict, dict]:
    """Write `name`'s upstream checkpoint; return (path, trunk weights, head weights) where the
    weights are keyed as the encoder's trunk / head modules name them. DINO's unused last layer is
    weight-normed as upstream stores it, or plain as the layouts file lists it."""
    spec = layouts()[name]
    url_name = {
        "supervised": "resnet50-0676ba61.pth",
    }.get(name) or spec["url"].rsplit("/", 1)[1]
    path = directory / url_name
    if name == "dino":
        sd = random_state(spec["keys"], seed)
        last = sd.pop("head.last_layer.weight")
        trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
        head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
        teacher = {f"module.backbone.{k}": v for k, v in trunk.items()}
        teacher.update({f"module.head.{k}": v for k, v in head.items()})
        # Upstream DINO's last layer is weight-normed: weight_g / weight_v, never used by RCDM.
        if dino_weight_norm:
            teacher["module.head.last_layer.weight_g"] = torch.ones(last.shape[0], 1)
            teacher["module.head.last_layer.weight_v"] = last
        else:
            teacher["module.head.last_layer.weight"] = last
        obj = {"teacher": teacher, "student": {"module.backbone.conv1.weight": torch.randn(2)},
               "args": argparse.Namespace(arch="resnet50", out_dim=60000, use_bn_in_head=True,
                                          lr=0.3, local_crops_scale=(0.05, 0.14)),
               "dino_loss": {"center": torch.randn(1, 60000)}, **_training_state(seed)}
    elif name in ("simclr", "barlow"):
        trunk = random_state(spec["trunk_keys"], seed)
        if name == "simclr":
            head = random_state(spec["heads_keys_after_rename"], seed + 1)
            ours = {"mlp.0": "0", "mlp.1": "2"}
            upstream = {"mlp.0": "0.clf.0", "mlp.1": "1.clf.0"}
            heads = {upstream[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v
                     for k, v in head.items()}
            head = {ours[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v
                    for k, v in head.items()}
        else:
            head = random_state(spec["heads_keys_after_strip"], seed + 1)
            heads = {k.split(".", 1)[0] + ".clf." + k.split(".", 1)[1]: v for k, v in head.items()}
        obj = {
            "phase_idx": 999, "iteration": 1_250_000, "iteration_num": 1_250_000,
            "train_phase_idx": 999, "type": "full",
            "loss": {"temperature": np.float64(0.1)},
            "classy_state_dict": {
                "train": True,
                "base_model": {"model": {
                    "trunk": {f"_feature_blocks.{k}": v for k, v in trunk.items()},
                    "heads": heads,
                }, "meta": {"model_version": np.int64(1)}},
                "losses": [np.float64(5.1), np.float64(5.0)],
                **_training_state(seed),
            },
        }
    elif name == "vicreg":
        sd = random_state(spec["keys"], seed)
        trunk = {k: v for k, v in sd.items() if not k.startswith("projector.")}
        head = {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}
        model = {f"module.backbone.{k}": v for k, v in trunk.items()}
        model.update({f"module.projector.{k}": v for k, v in head.items()})
        obj = {"model": model, **_training_state(seed)}
    elif name == "supervised":
        trunk = random_state(spec["keys"], seed)
        head = {}
        obj = {**trunk, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    else:
        raise KeyError(name)
    torch.save(obj, path)
    return path, trunk, head


def write_rcdm_file(path: Path, ssl_dim_key: str = "trunk", seed: int = 0) -> dict:
    """A published RCDM checkpoint (plain state dict) with the 128x128 keys and shapes."""
    ref = json.loads((REFERENCE_DIR / "pretrained_128_keys.json").read_text())
    shapes = dict(ref["state_dict"])
    dim = ref["ssl_dims"][ssl_dim_key]
    shapes["ssl_emb.weight"] = [shapes["ssl_emb.weight"][0], dim]
    sd = random_state(shapes, seed, big=1 << 16)  # 422.6M parameters: keep the file small
    torch.save(sd, path)
    return sd


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    cut: set[str] = set()

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        # Files named in `cut` announce their full length but stop halfway: a dropped transfer.
        if self.path.rsplit("/", 1)[-1] in self.cut:
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


@contextlib.contextmanager
def serve_directory(directory: Path, cut: set[str] = frozenset()):
    """Serve `directory` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = type("Handler", (_QuietHandler,), {"cut": set(cut)})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
