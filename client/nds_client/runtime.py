"""Running exported networks with onnxruntime, without torch.

The lightweight client imports this module, so it imports only numpy, onnxruntime and
(optionally) onnx; never torch or sqlalchemy.

``onnxruntime`` and ``onnxruntime-gpu`` install the same import name and break each other
side by side, so ``nds-client`` depends on neither: the user picks one
(``pip install 'nds-client[cpu]'`` or ``'nds-client[gpu]'``), or keeps the one installed,
and this module runs on either. It is imported when a network first runs, not with this
module; without it that call raises :class:`~nds_client.errors.MissingDependencyError`
saying what to install.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on a machine
without a GPU, and a session asking for it then logs an error and falls back to the
CPU. So :func:`create_session` asks for CUDA only when a GPU is visible, and the provider
really in use is read back from the session (:func:`active_provider`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from nds_client.errors import ArtifactError, MissingDependencyError

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

ModelSource = str | os.PathLike | bytes


@functools.cache
def load_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module (from the onnxruntime or the onnxruntime-gpu wheel);
    MissingDependencyError when neither is installed."""
    try:
        import onnxruntime as module
    except ImportError as exc:
        raise MissingDependencyError(
            f"running the experts needs onnxruntime, which is not installed ({exc})",
            hint="pip install 'nds-client[cpu]' (or 'nds-client[gpu]' for onnxruntime-gpu; never both)",
        ) from exc
    return module


def _gpu_visible() -> bool | None:
    """True/False when we can tell without initialising CUDA, None when we cannot."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
        if any(Path("/dev").glob("nvidia[0-9]*")):
            return True
        return None if Path("/dev/dxg").exists() else False  # /dev/dxg: WSL2, GPUs without /dev/nvidia*
    return None


def cuda_usable() -> bool | None:
    """Whether asking onnxruntime for CUDA makes sense here: False when the CUDA provider
    is not built in or no GPU is visible, True when one is, None when unknown."""
    if CUDA not in load_onnxruntime().get_available_providers():
        return False
    return _gpu_visible()


def _describe(source: ModelSource) -> str:
    return f"{len(source)} bytes of ONNX" if isinstance(source, bytes | bytearray) else str(source)


def create_session(
    source: ModelSource,
    prefer_gpu: bool = True,
    *,
    intra_op_num_threads: int | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for a model file or its bytes: the CUDA provider first when
    ``prefer_gpu`` and a GPU is usable, then the CPU. Check :func:`active_provider` for the
    provider really in use."""
    ort = load_onnxruntime()
    options = ort.SessionOptions()
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    providers = [CPU]
    usable = cuda_usable() if prefer_gpu else False
    if usable is not False:
        providers = [CUDA, CPU]
        if usable is None:  # cannot tell: a fallback is likely, keep its error out of the logs
            options.log_severity_level = 3
        preload = getattr(ort, "preload_dlls", None)  # CUDA/cuDNN from the nvidia-* wheels, if any
        if preload is not None:
            try:
                preload()
            except Exception:  # noqa: BLE001 - best effort; the session reports what it got
                logger.debug("onnxruntime.preload_dlls failed", exc_info=True)
    model = bytes(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise ArtifactError(
            f"cannot load ONNX model from {_describe(source)}: {exc}",
            hint="re-download or re-export the model",
        ) from exc
    if CUDA in providers and active_provider(session) != CUDA:
        logger.info("onnxruntime fell back from CUDA to %s", active_provider(session))
    return session


def active_provider(session: ort.InferenceSession) -> str:
    """The execution provider that runs the session, e.g. ``"CUDAExecutionProvider"``."""
    return session.get_providers()[0]


def read_metadata(source: ModelSource) -> dict[str, str]:
    """The model's ``metadata_props`` (all strings). Reads only the header with onnx when
    it is installed, else opens an onnxruntime session on the CPU."""
    try:
        import onnx
    except ImportError:
        onnx = None  # type: ignore[assignment]
    try:
        if onnx is not None:
            proto = (
                onnx.load_model_from_string(bytes(source))
                if isinstance(source, bytes | bytearray)
                else onnx.load(os.fspath(source), load_external_data=False)
            )
            return {p.key: p.value for p in proto.metadata_props}
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ArtifactError(f"cannot read ONNX metadata from {_describe(source)}: {exc}") from exc
    session = create_session(source, prefer_gpu=False)
    return dict(session.get_modelmeta().custom_metadata_map)


def run(session: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a network exported by :mod:`nds.catalog.model.export`: float32 (B, C, S, S),
    already normalised -> (logits (B, num_outputs), features (B, feature_dim))."""
    logits, features = session.run(["logits", "features"], {"images": np.ascontiguousarray(images, dtype=np.float32)})
    return logits, features
