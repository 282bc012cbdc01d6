"""The Audio Spectrogram Transformer network in plain PyTorch, loading Hugging Face AST checkpoints.

Importing `transformers` to run this one model cost 5-6 s before the first query (its
modeling base pulls in sympy, scipy.optimize, the hub client and 160 modules), against
0.1 s for reading the weights. This module is the same network (Gong et al., "AST: Audio
Spectrogram Transformer", 2021; the layout of transformers' `ASTForAudioClassification`):
a 16x16 patch convolution over the log-mel frames, [CLS] and distillation tokens, learned
position embeddings, pre-norm encoder layers, a final layer norm whose two first tokens
are averaged into the pooled output, and a layer-norm + linear head.

Parameters carry the names transformers (>= 5) gives them in memory, so the model's
fingerprint (a hash over names and bytes, see model.py) is the one indexes already
record. Checkpoints saved with the older names (`encoder.layer.N.attention.attention.query`,
as on the hub and as `save_pretrained` still writes them) are renamed on load, and every
tensor's shape is checked against the config. Weights load from safetensors only.
tests/test_ast.py holds this network to transformers' on the same checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

CONFIG_FILE, WEIGHTS_FILE, FEATURES_FILE = "config.json", "model.safetensors", "preprocessor_config.json"


@dataclass
class ASTConfig:
    """The checkpoint's config.json fields this network uses (defaults: transformers' ASTConfig)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024  # frames
    num_mel_bins: int = 128
    id2label: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ASTConfig:
        raw = json.loads(path.read_text())
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known["id2label"] = {int(i): name for i, name in raw.get("id2label", {}).items()}
        config = cls(**known)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} in {path}")
        return config

    def patch_grid(self) -> tuple[int, int]:
        """(frequency, time) patches per segment."""
        f = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        t = (self.max_length - self.patch_size) // self.time_stride + 1
        return f, t


_ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class Embeddings(nn.Module):
    def __init__(self, c: ASTConfig):
        super().__init__()
        f, t = c.patch_grid()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, f * t + 2, c.hidden_size))
        self.patch_embeddings = SimpleModule(projection=nn.Conv2d(
            1, c.hidden_size, kernel_size=(c.patch_size, c.patch_size), stride=(c.frequency_stride, c.time_stride)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, frames, mel bins] -> tokens [B, 2 + patches, D]."""
        patches = self.patch_embeddings.projection(feats.unsqueeze(1).transpose(2, 3)).flatten(2).transpose(1, 2)
        b = feats.shape[0]
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), self.distillation_token.expand(b, -1, -1), patches), 1)
        return tokens + self.position_embeddings


class SimpleModule(nn.Module):
    """A named holder of submodules, for the checkpoint's nesting (`patch_embeddings.projection`)."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


class Attention(nn.Module):
    def __init__(self, c: ASTConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=c.qkv_bias) for _ in range(3))
        self.o_proj = nn.Linear(d, d)

    def fuse_projections(self) -> None:
        """One [3D x D] projection for queries, keys and values instead of three [D x D] ones.

        For int8 (`model.quantize_linear`): the input is then quantised once, not three
        times, and one GEMM three times as wide runs closer to the CPU's peak. Per-output-channel
        weight scales make the fused layer compute exactly what the three did.
        """
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = nn.Linear(self.q_proj.in_features, 3 * self.q_proj.out_features, bias=self.q_proj.bias is not None)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self, c: ASTConfig):
        super().__init__()
        self.attention = Attention(c)
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SimpleModule(fc1=nn.Linear(c.hidden_size, c.intermediate_size), act=_ACTIVATIONS[c.hidden_act](),
                                fc2=nn.Linear(c.intermediate_size, c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        m = self.mlp
        return x + m.fc2(m.act(m.fc1(self.layernorm_after(x))))


class Encoder(nn.Module):
    def __init__(self, c: ASTConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, feats: torch.Tensor) -> SimpleNamespace:
        """`.last_hidden_state` [B, tokens, D] and `.pooler_output` [B, D], as transformers' ASTModel returns."""
        x = self.embeddings(feats)
        for layer in self.layers:
            x = layer(x)
        x = self.layernorm(x)
        return SimpleNamespace(last_hidden_state=x, pooler_output=(x[:, 0] + x[:, 1]) / 2)


class Head(nn.Module):
    def __init__(self, c: ASTConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dense = nn.Linear(c.hidden_size, len(c.id2label))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(self.layernorm(pooled))


class ASTForAudioClassification(nn.Module):
    """The encoder and the classifier head, under the attribute names the checkpoints use."""

    def __init__(self, config: ASTConfig):
        super().__init__()
        self.config = config
        self.audio_spectrogram_transformer = Encoder(config)
        self.classifier = Head(config)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ASTForAudioClassification:
        """Load a checkpoint folder (config.json + model.safetensors), checking every tensor's shape."""
        from safetensors.torch import load_file

        folder = Path(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise OSError(f"no {WEIGHTS_FILE} in {folder}")
        net = cls(ASTConfig.from_file(folder / CONFIG_FILE))
        state = {_new_name(k): v for k, v in load_file(weights).items()}
        expected = net.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights} is not an AST checkpoint of this config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the config says "
                                 f"{tuple(expected[name].shape)}")
        net.load_state_dict(state, assign=True)
        return net.eval()


_RENAMES = [  # the names checkpoints are saved with -> the names in memory (transformers >= 5)
    (re.compile(r"\.encoder\.layer\.(\d+)\."), r".layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"(\.layers\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]


def _new_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


@dataclass(frozen=True)
class Extractor:
    """The preprocessor_config.json settings that `logmel.FeatureConfig.from_extractor` reads."""

    sampling_rate: int = 16000
    num_mel_bins: int = 128
    max_length: int = 1024
    mean: float = -4.2677393
    std: float = 4.5689974
    do_normalize: bool = True

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Extractor:
        path = Path(folder) / FEATURES_FILE
        raw = json.loads(path.read_text()) if path.exists() else {}
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def checkpoint_folder(name_or_path: str) -> Path:
    """A local folder as is; a hub id through the Hugging Face cache (downloaded when online)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return local
    from huggingface_hub import hf_hub_download

    files = [hf_hub_download(name_or_path, f) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    try:
        hf_hub_download(name_or_path, FEATURES_FILE)
    except Exception:  # a checkpoint without one uses AudioSet's defaults
        pass
    return Path(files[0]).parent
