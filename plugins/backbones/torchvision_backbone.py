"""``torchvision:<arch>``: an ImageNet classifier from torchvision with its head removed.

Weights come through torchvision's normal mechanism (downloaded once into the torch hub
cache) or from a local file given with ``--weights PATH`` (a state dict saved with
``torch.save(model.state_dict(), PATH)``), for machines without internet access.
"""

from __future__ import annotations

import numpy as np

from nds.plugins.contract import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneEnv, PluginError, normalize_rows, sha256_file, to_nchw


class TorchvisionBackbone(Backbone):
    def __init__(self, model, *, version: str, input_size: int) -> None:  # noqa: ANN001 - torch module
        import torch

        self.model = model.eval()
        self.version = version
        self.input_size = input_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        with torch.no_grad():
            self.dim = int(self.model(torch.zeros(1, 3, input_size, input_size)).reshape(1, -1).shape[1])

    def embed(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(to_nchw(images[start : start + batch_size], self.mean, self.std))
                out.append(self.model(x).reshape(len(x), -1).numpy())
        return normalize_rows(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


def _strip_head(model):  # noqa: ANN001, ANN202 - torch modules
    from torch import nn

    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    raise PluginError(f"do not know how to remove the head of {type(model).__name__}", hint="export it to ONNX and use onnx:<file>")


def load(arg: str | None, env: BackboneEnv) -> Backbone:
    import torch
    import torchvision.models as tvm

    if not arg:
        raise PluginError("name the architecture: torchvision:<arch>", hint=f"e.g. torchvision:resnet18; known: {', '.join(sorted(tvm.list_models())[:12])}, ...")
    if arg not in tvm.list_models():
        raise PluginError(f"torchvision has no model {arg!r}", hint="see torchvision.models.list_models()")
    if env.weights is not None:
        model = tvm.get_model(arg, weights=None)
        try:
            state = torch.load(env.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # torch raises RuntimeError/UnpicklingError/KeyError for bad files
            raise PluginError(f"cannot load weights for {arg} from {env.weights}: {exc}", hint="save them with torch.save(model.state_dict(), path)") from exc
        tag = f"file-{sha256_file(env.weights)[:12]}"
    else:
        weights = tvm.get_model_weights(arg).DEFAULT
        try:
            model = tvm.get_model(arg, weights=weights)
        except Exception as exc:  # no network, proxy, disk: say what to do instead
            raise PluginError(
                f"cannot fetch the {arg} weights ({weights}): {exc}",
                hint="on a machine without internet access, pass --weights PATH to a local state dict",
            ) from exc
        tag = str(weights).split(".")[-1]
    return TorchvisionBackbone(_strip_head(model), version=f"torchvision-{arg}-{tag}", input_size=224)
