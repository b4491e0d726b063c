"""onnxruntime inference for exported face-recognition models.

The exporter (``eval.export_onnx``) records the input normalisation in the
model's metadata (``input_mean`` / ``input_std`` on 0..255 RGB pixels); this
helper reads it back, so callers only pass aligned uint8 faces.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

DEFAULT_MEAN = 127.5
DEFAULT_STD = 127.5


def _providers(device: str) -> list[str | tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        # "cuda:N" (a torchrun rank's cuda:LOCAL_RANK) selects GPU N, not always GPU 0
        _, _, index = device.partition(":")
        options = {"device_id": int(index)} if index else {}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEmbedder:
    """An onnxruntime session usable wherever an :data:`~eval.extract.Embedder` is.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (falls back to CPU without the
            CUDA provider).
        intra_op_threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(
        self, path: str | os.PathLike[str], device: str = "cpu", intra_op_threads: int = 0
    ) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(self.path, opts, providers=_providers(device))
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        meta: dict[str, Any] = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.mean = float(meta.get("input_mean", DEFAULT_MEAN))
        self.std = float(meta.get("input_std", DEFAULT_STD))
        self.color = str(meta.get("input_color", "RGB"))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model output: float32 ``(B, 3, H, W)`` normalised input -> ``(B, D)``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embedder protocol: float ``(B, 3, H, W)`` in ``[-1, 1]`` (RGB) -> float32 ``(B, D)``."""
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))

    def embed_faces(self, faces: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        """L2-normalised embeddings of aligned faces.

        Args:
            faces: uint8 ``(B, H, W, 3)`` or ``(H, W, 3)`` aligned face crops,
                RGB (or BGR as read by OpenCV with ``bgr=True``).
        Returns:
            float32 ``(B, D)`` unit-norm embeddings.
        """
        faces = np.asarray(faces)
        if faces.ndim == 3:
            faces = faces[None]
        if faces.ndim != 4 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be (B, H, W, 3), got {faces.shape}")
        if bgr != (self.color.upper() == "BGR"):
            faces = faces[..., ::-1]
        x = (faces.astype(np.float32) - self.mean) / self.std
        emb = self.run(x.transpose(0, 3, 1, 2))
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norm, 1e-12)).astype(np.float32)
