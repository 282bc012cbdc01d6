"""The Audio Spectrogram Transformer: loading, precision, and one batched forward pass.

The embedding is the pooled output that AST's classifier head reads (the mean
of the [CLS] and distillation tokens after the final layer norm),
L2-normalised so that inner product is cosine similarity. Label scores are
the sigmoid of the head's logits over the checkpoint's `id2label`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .heap import keep_freed_memory
from .logmel import FeatureConfig, LogMel
from .model_ref import DEFAULT_MODEL, check_model_available, model_reference

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelOutput:
    """One batch of model results, on the CPU."""

    embeddings: torch.Tensor  # float32 [B, D], unit norm
    scores: torch.Tensor  # float32 [B, labels], sigmoid
    tokens: torch.Tensor | None = None  # [B, T', F', D] last-layer patch tokens, when asked for


class PendingOutput:
    """A batch queued on the model's device; `result()` waits for it.

    On a GPU the forward pass and the copies back to (pinned) host memory are
    queued without waiting, so the caller can prepare and queue the next batch
    while this one computes: one batch in flight keeps the GPU busy with no
    per-batch stall. On a CPU everything has already run.
    """

    def __init__(self, output: ModelOutput, event: torch.cuda.Event | None = None):
        self._output, self._event = output, event

    def result(self) -> ModelOutput:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._output


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` means the GPU when torch sees one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device} was asked for but torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved


def resolve_precision(precision: str, device: torch.device, *, allow_int8: bool = False) -> str:
    """Pick the fastest precision the hardware runs natively.

    GPUs: bfloat16 where supported (Ampere and later), else float16. CPUs: bfloat16 with
    native support (AMX or AVX512-BF16; emulated bf16 is slower than float32); otherwise
    int8 linear layers when `allow_int8` (ingest and query: search can afford cosine >= 0.99
    to float32), else float32 (`embed` and `Embedder`: features taken as the model's own).
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ModelLoadError("--precision int8 runs on the CPU only; use --device cpu, or bf16/fp16 on a GPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        with torch.cuda.device(device):  # native bf16 only: emulated bf16 (pre-Ampere) is slow
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if cpu_has_native_bf16():
        return "bf16"
    return "int8" if allow_int8 else "fp32"


def quantize_linear(net: torch.nn.Module) -> torch.nn.Module:
    """In place: every nn.Linear as a dynamic int8 one: int8 weights (per output channel), activations
    quantised per batch on the fly, int32 accumulation; attention, norms and GELU stay float32.

    The linear layers are ~79% of AST's FLOPs and int8 GEMMs run at about twice float32's rate
    on AVX2 (vpmaddubsw kernels) and on VNNI. The oneDNN kernels, where torch has them, were ~6%
    faster than fbgemm's over the whole AST on a 2-core AVX2 EPYC, at the same fidelity
    (BENCHMARKS.md); the engine is process-wide and weights are packed for the one in force.
    Queries, keys and values become one layer first (`Attention.fuse_projections`).
    Fidelity: tests/test_precision.py.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from .ast import Attention

    for module in net.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(net, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16, and the kernels allowed to use them (not capped with
    ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16)."""
    cpu = torch.cpu
    hardware = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    capped = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2") or not onednn.startswith(_BF16_ISAS)
    return hardware and not capped


_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


def cpu_features() -> set[str]:
    """The CPU's vector and matrix extensions that matter here (AVX2, AVX-512, VNNI, AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {f for f in flags if f in ("avx2", "fma", "avx_vnni") or f.startswith(("avx512", "amx"))}


class Model:
    """An AST checkpoint ready to embed batches of 16 kHz waveforms.

    `name_or_path` is a Hugging Face id or a local directory saved with
    `save_pretrained`. Weights load from safetensors only and no remote code
    ever runs.
    """

    def __init__(self, name_or_path: str = DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                 auto_int8: bool = False):
        """`auto_int8`: whether `precision="auto"` may pick int8 (CPUs without native bf16); ingest
        and query allow it, embedding for its own sake does not (see `resolve_precision`)."""
        self.name = model_reference(str(name_or_path))  # what an index records: an absolute path or a hub id
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, allow_int8=auto_int8)
        self.net, extractor = _load(self.name)
        self.fingerprint = _fingerprint(self.net)  # of the stored weights, before any cast
        self.net.to(self.device).eval()
        # bf16 has float32's range, so the weights are cast once and activations stay in bf16
        # (faster than autocast's per-op casts, half the memory; cosine >= 0.999 vs float32,
        # see tests/test_precision.py). fp16 would risk overflow: it runs under autocast.
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.net.to(self.dtype)
        if self.precision == "int8":  # the encoder's: the head is 0.0003% of the FLOPs, and amplifies errors
            quantize_linear(self.net.audio_spectrogram_transformer)
        self.features = FeatureConfig.from_extractor(extractor)
        self.logmel = LogMel(self.features).to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
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

    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor, *, tokens: bool = False) -> ModelOutput:
        """Embed a batch: waveforms [B, N] zero-padded, lengths [B] in samples."""
        return self.launch(waveforms, lengths, tokens=tokens).result()

    @torch.inference_mode()
    def launch(self, waveforms: torch.Tensor, lengths: torch.Tensor, *, tokens: bool = False) -> PendingOutput:
        """Queue a batch without waiting for it (on a GPU); `.result()` on the return value waits.

        `waveforms` may be reused once the result is in (its copy to the device is done by then).
        """
        waveforms = waveforms.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device, non_blocking=True)
        feats = self.logmel(waveforms, lengths)
        pooled, logits, hidden = self.forward_features(feats)
        emb = torch.nn.functional.normalize(pooled.float(), dim=-1)
        outputs = [emb, torch.sigmoid(logits.float())]
        if tokens:
            outputs.append(self._grid(hidden[:, 2:]).float())
        if self.device.type != "cuda":
            return PendingOutput(ModelOutput(*outputs))
        # non_blocking copies to the CPU land in pinned memory; the event says when they have
        host = [t.to("cpu", non_blocking=True) for t in outputs]
        # blocking: waiting on it sleeps (cudaEventBlockingSync) instead of spinning a core
        # that the decoders feeding the GPU need
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(self.device))  # the copies' stream, even on cuda:N
        return PendingOutput(ModelOutput(*host), event)

    @torch.inference_mode()
    def forward_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network alone, at the model's precision: features [B, frames, mel bins] ->
        (pooled output [B, D], logits [B, labels], last hidden state [B, tokens, D])."""
        if self.precision == "int8":
            # One segment at a time: a dynamic int8 layer scales its input by the tensor's range, so
            # in a batch a loud segment would coarsen its neighbours' steps and a segment's embedding
            # would depend on the files it happened to be batched with.
            outs = [self._forward(feats[i : i + 1]) for i in range(len(feats))]
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return self._forward(feats)

    def _forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self._autocast():
            out = self.net.audio_spectrogram_transformer(feats.to(self.dtype))
            logits = self.net.classifier(out.pooler_output)
        return out.pooler_output, logits, out.last_hidden_state

    def _grid(self, patches: torch.Tensor) -> torch.Tensor:
        t, f = self.patch_grid()
        return patches.reshape(patches.shape[0], f, t, -1).transpose(1, 2)

    def _autocast(self):
        dtype = _DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None and dtype != self.dtype)


def _load(name_or_path: str):
    """The network and its feature settings, from a local folder or a hub id (through the HF cache)."""
    from .ast import ASTForAudioClassification, Extractor, checkpoint_folder

    check_model_available(name_or_path)
    local = Path(name_or_path).expanduser()
    try:
        folder = checkpoint_folder(name_or_path)
        net = ASTForAudioClassification.from_pretrained(folder)
        extractor = Extractor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        hint = "" if local.exists() else " (not a local directory; offline, pass --model /path/to/a/saved/checkpoint)"
        if local.is_dir() and not list(local.glob("*.safetensors")):
            hint = (" (weights load from safetensors only: a pickled .bin checkpoint can run code when loaded; "
                    "re-save it with save_pretrained(safe_serialization=True))")
        raise ModelLoadError(f"cannot load AST model {name_or_path!r}{hint}: {_first_line(e)}") from e
    return net, extractor


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def fingerprint(model: Model) -> str:
    """A short hash of weights that identify a checkpoint, wherever it was loaded from, at any precision."""
    return model.fingerprint


def _fingerprint(net) -> str:
    """"w1:<hex>", XXH3-128 over every parameter and buffer of the network: name, dtype, shape and bytes.

    All of them, since any one changes the output (an index once accepted a checkpoint with an
    encoder weight changed). Taken from the weights as loaded, before any cast, so precision does
    not change it. XXH3 hashes the 345 MB of a full-size AST in 0.03 s of CPU (2-core Xeon).
    """
    import xxhash

    h = xxhash.xxh3_128()
    for name, tensor in sorted(net.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(data.view(torch.uint8).numpy().data)
    return f"w1:{h.hexdigest()}"


def legacy_fingerprint(model: Model) -> str:
    """The fingerprint indexes held before "w1:": the patch-embedding and classifier weights only."""
    import hashlib

    net = model.net
    h = hashlib.blake2b(digest_size=8)
    for tensor in (
        net.audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight,
        net.classifier.dense.weight,
    ):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
