"""The Audio Spectrogram Transformer: loading, precision, and one batched forward pass.

The embedding is the pooled output that AST's classifier head reads (the mean
of the [CLS] and distillation tokens after the final layer norm),
L2-normalised so that inner product is cosine similarity. Label scores are
the sigmoid of the head's logits over the checkpoint's `id2label`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .features import FeatureConfig, LogMel

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelOutput:
    """One batch of model results, on the CPU."""

    embeddings: torch.Tensor  # float32 [B, D], unit norm
    scores: torch.Tensor  # float32 [B, labels], sigmoid
    tokens: torch.Tensor | None = None  # [B, T', F', D] last-layer patch tokens, when asked for


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` means the GPU when torch sees one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the fastest precision the hardware runs natively.

    GPUs: bfloat16 where supported (Ampere and later), else float16. CPUs:
    bfloat16 only with native support (AMX or AVX512-BF16); emulated bf16 is
    slower than float32.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


class Model:
    """An AST checkpoint ready to embed batches of 16 kHz waveforms.

    `name_or_path` is a Hugging Face id or a local directory saved with
    `save_pretrained`. Weights load from safetensors only and no remote code
    ever runs.
    """

    def __init__(self, name_or_path: str = DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto"):
        self.name = str(name_or_path)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.net, extractor = _load(self.name)
        self.net.to(self.device).eval()
        self.features = FeatureConfig.from_extractor(extractor)
        self.logmel = LogMel(self.features).to(self.device)
        self.id2label: dict[int, str] = {int(i): name for i, name in self.net.config.id2label.items()}
        self.dim: int = self.net.config.hidden_size

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    def patch_grid(self) -> tuple[int, int]:
        """(T', F'): the number of time and frequency patches per segment."""
        c = self.net.config
        f = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1
        t = (c.max_length - c.patch_size) // c.time_stride + 1
        return t, f

    @torch.inference_mode()
    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor, *, tokens: bool = False) -> ModelOutput:
        """Embed a batch: waveforms [B, N] zero-padded, lengths [B] in samples."""
        waveforms = waveforms.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device, non_blocking=True)
        feats = self.logmel(waveforms, lengths)
        with self._autocast():
            out = self.net.audio_spectrogram_transformer(feats)
            logits = self.net.classifier(out.pooler_output)
        emb = torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)
        result = ModelOutput(emb.cpu(), torch.sigmoid(logits.float()).cpu())
        if tokens:
            result.tokens = self._grid(out.last_hidden_state[:, 2:]).cpu()
        return result

    def _grid(self, patches: torch.Tensor) -> torch.Tensor:
        t, f = self.patch_grid()
        return patches.reshape(patches.shape[0], f, t, -1).transpose(1, 2)

    def _autocast(self):
        dtype = _DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def _load(name_or_path: str):
    from transformers import ASTFeatureExtractor, ASTForAudioClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    try:
        net = ASTForAudioClassification.from_pretrained(
            source, use_safetensors=True, attn_implementation="sdpa"
        )
        with warnings.catch_warnings():  # its numpy mel bank warns of an all-zero filter, harmless
            warnings.simplefilter("ignore", UserWarning)
            extractor = ASTFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = "" if local.exists() else " (not a local directory; offline, pass --model /path/to/a/saved/checkpoint)"
        raise ModelLoadError(f"cannot load AST model {name_or_path!r}{hint}: {_first_line(e)}") from e
    return net, extractor


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def fingerprint(model: Model) -> str:
    """A short hash of weights that identify a checkpoint, wherever it was loaded from."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    net = model.net
    for tensor in (
        net.audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight,
        net.classifier.dense.weight,
    ):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
