"""AST log-mel features in torch, batched and device-agnostic.

Reproduces ``transformers.ASTFeatureExtractor`` (its numpy path, i.e. Kaldi-style
fbank) so that a whole batch can be featurised in one call on CPU or GPU instead
of one clip at a time in float64 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# The extractor hard-codes these (in samples / FFT points), whatever the sampling rate.
FRAME_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 eps: Kaldi's floor before the log
MIN_FREQUENCY = 20.0
_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class FeatureConfig:
    """The extractor settings that change the features (defaults: AudioSet AST checkpoints)."""

    sampling_rate: int = 16000
    num_mel_bins: int = 128
    max_length: int = 1024  # frames fed to the model
    mean: float = -4.2677393
    std: float = 4.5689974
    do_normalize: bool = True

    @classmethod
    def from_extractor(cls, extractor: Any) -> FeatureConfig:
        """Read the settings off an ``ASTFeatureExtractor`` so a checkpoint's own values are used."""
        return cls(
            sampling_rate=int(extractor.sampling_rate),
            num_mel_bins=int(extractor.num_mel_bins),
            max_length=int(extractor.max_length),
            mean=float(extractor.mean),
            std=float(extractor.std),
            do_normalize=bool(extractor.do_normalize),
        )

    @property
    def max_samples(self) -> int:
        """Samples spanned by ``max_length`` frames; anything later is truncated away."""
        return FRAME_LENGTH + HOP_LENGTH * (self.max_length - 1)


def kaldi_mel_filters(config: FeatureConfig) -> torch.Tensor:
    """[FFT_LENGTH//2 + 1, num_mel_bins] float64 filter bank, built as the extractor builds it.

    Kaldi mel scale, 20 Hz .. Nyquist, triangles drawn in mel space, no area normalisation.
    """
    num_bins = FFT_LENGTH // 2 + 1

    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log(1.0 + hz / 700.0)

    limits = torch.tensor([MIN_FREQUENCY, config.sampling_rate // 2], dtype=torch.float64)
    mel_min, mel_max = to_mel(limits).tolist()
    edges = torch.linspace(mel_min, mel_max, config.num_mel_bins + 2, dtype=torch.float64)
    bin_width = config.sampling_rate / FFT_LENGTH
    bin_mels = to_mel(bin_width * torch.arange(num_bins, dtype=torch.float64))
    slopes = edges[None, :] - bin_mels[:, None]
    widths = edges.diff()
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return torch.minimum(down, up).clamp_min(0.0)


def frame_counts(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Frames the extractor computes per clip ("snip edges"), capped at ``max_length``.

    Clips shorter than one frame get 0, i.e. all padding.
    """
    counts = torch.div(lengths - FRAME_LENGTH, HOP_LENGTH, rounding_mode="floor") + 1
    return counts.clamp(min=0, max=max_length)


def framing_operator() -> torch.Tensor:
    """[FRAME_LENGTH, 2 * (FFT_LENGTH//2 + 1)] float64 matrix: raw frame -> [Re | Im] of its spectrum.

    Folds the extractor's per-frame steps (DC removal, Kaldi pre-emphasis where the first
    sample uses itself, symmetric Hann window, zero-padded 512-point DFT) into one linear map,
    built exactly in float64. Applying it as a single matmul rounds once instead of at every
    step, which keeps float32 bins near the log floor far closer to the float64 reference
    than float32 rFFT does (and is faster on CPU).
    """
    eye = torch.eye(FRAME_LENGTH, dtype=torch.float64)
    remove_dc = eye - 1.0 / FRAME_LENGTH
    preemphasis = eye - PREEMPHASIS * eye.roll(-1, dims=1).tril()
    preemphasis[0, 0] = 1.0 - PREEMPHASIS
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64)
    to_windowed = window[:, None] * (preemphasis @ remove_dc)
    dft = torch.fft.rfft(eye, n=FFT_LENGTH, dim=0)  # [bins, FRAME_LENGTH]
    return torch.cat((dft.real @ to_windowed, dft.imag @ to_windowed)).T.contiguous()


class LogMel(torch.nn.Module):
    """Batched AST features; window and mel matrix are buffers so .to(device) moves them.

    The window lives inside the framing operator (see ``framing_operator``). float32 is
    exact to ~1e-3 (normalised) for audio scaled to [-1, 1]; the extractor's log floor is
    absolute, so int16-scaled floats (|x| ~ 3e4) need ~200 dB of range: use float64 there.
    """

    def __init__(self, config: FeatureConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.config = config
        self.register_buffer("operator", framing_operator().to(dtype), persistent=False)
        # Stacked twice so one contiguous matmul does |X|^2 @ mel = [Re^2 | Im^2] @ [mel; mel].
        mel_filters = kaldi_mel_filters(config).repeat(2, 1)
        self.register_buffer("mel_filters", mel_filters.to(dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Compute and output dtype; follows the buffers so ``.double()`` keeps it consistent.

        (Full float64 accuracy needs ``dtype=torch.float64`` at construction: casting keeps
        the float32-rounded operator.)
        """
        return self.operator.dtype

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """waveforms: [B, N] float, zero-padded on the right; lengths: [B] int64 true lengths in samples.

        Returns [B, max_length, num_mel_bins] normalised features in self.dtype. Frames that do
        not fit inside a clip's true length (``lengths`` <= N) are padding (0 before
        normalisation), as in the extractor. Clips under 400 samples come out as all padding:
        the extractor does the same for 240..399 samples and raises for fewer than 240.
        """
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms must be [B, N], got shape {tuple(waveforms.shape)}")
        frames = self._frames(waveforms)
        log_mel = self._log_mel(frames)
        log_mel = self._mask_and_pad(log_mel, lengths.to(waveforms.device))
        if self.config.do_normalize:
            log_mel = log_mel.sub_(self.config.mean).div_(2.0 * self.config.std)
        return log_mel

    def _frames(self, waveforms: torch.Tensor) -> torch.Tensor:
        """[B, T, FRAME_LENGTH] overlapping frames of the first ``max_samples`` samples."""
        x = waveforms[:, : self.config.max_samples].to(self.dtype)
        if x.shape[1] < FRAME_LENGTH:  # no whole frame anywhere: make one, it is masked out later
            x = F.pad(x, (0, FRAME_LENGTH - x.shape[1]))
        return x.unfold(1, FRAME_LENGTH, HOP_LENGTH)

    def _spectrum(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 2 * bins] = [Re | Im] of each frame's preprocessed DFT.

        Under reduced float32 matmul precision (TF32 / bf16, e.g. set for the model) the DFT
        runs in float64 instead: ~10 mantissa bits would wreck bins near the log floor.
        """
        if self.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return torch.matmul(frames.double(), self.operator.double()).float()
        return torch.matmul(frames, self.operator)

    def _log_mel(self, frames: torch.Tensor) -> torch.Tensor:
        """Kaldi fbank per frame: power spectrum, mel filter bank, floored natural log."""
        squares = self._spectrum(frames).square_()
        return torch.matmul(squares, self.mel_filters).clamp_min_(MEL_FLOOR).log_()

    def _mask_and_pad(self, log_mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Zero frames past each clip's end and pad the time axis to ``max_length``."""
        counts = frame_counts(lengths, self.config.max_length)
        frame_index = torch.arange(log_mel.shape[1], device=log_mel.device)
        valid = (frame_index[None, :] < counts[:, None])[..., None]
        log_mel = log_mel.masked_fill_(~valid, 0.0)
        missing = self.config.max_length - log_mel.shape[1]
        return F.pad(log_mel, (0, 0, 0, missing)) if missing else log_mel
