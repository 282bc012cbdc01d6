"""Which runtime computes AST fastest at acceptable fidelity: torch float32 / bf16 / dynamic int8,
ONNX Runtime float32 / int8, OpenVINO float32, side by side in one run.

    python -m benchmarks.backends [--batch 8] [--reps 2] [--only torch-fp32,torch-int8,...]

Full-size random AST (ASTConfig defaults, the one `benchmarks.ingest` uses), a
batch of real log-mel features from generated sound scenes. Every backend gets the
same features and the same threads (all cores); each is timed over `--reps` batches
after one warm-up (wall time and the process's CPU time), and scored against torch float32: per-segment cosine of the pooled
embedding and the overlap of the top-5 labels. ONNX Runtime and OpenVINO run only
when installed (they are not dependencies of audiosearch).

To see what a CPU without AVX-512 would run, cap the kernels' instruction sets
(torch's own kernels, MKL, oneDNN and fbgemm honour these; ONNX Runtime and
OpenVINO do not, so their figures stay the native CPU's):

    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python -m benchmarks.backends
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.ingest import CACHE, _signal, checkpoint, cpu_report

BACKENDS = ["torch-fp32", "torch-bf16", "torch-int8", "ort-fp32", "ort-int8", "openvino-fp32"]


class Head(torch.nn.Module):
    """The network as ingest runs it: features -> (pooled output, logits)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, feats):
        out = self.net.audio_spectrogram_transformer(feats)
        return out.pooler_output, self.net.classifier(out.pooler_output)


def features(model, batch: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    waves = torch.from_numpy(np.stack([_signal(rng, 10.24, 16000)[:163840] for _ in range(batch)]))
    return model.logmel(waves, torch.full((batch,), waves.shape[1]))


def torch_runner(model):
    """`Model.forward_features` at the model's precision, exactly as ingest runs it."""
    def run(x):
        pooled, logits, _ = model.forward_features(x)
        return pooled.float().numpy(), logits.float().numpy()
    return run


def onnx_file(head: Head, x: torch.Tensor, tmp: Path) -> Path:
    path = tmp / "ast.onnx"
    with torch.inference_mode():
        torch.onnx.export(head, (x,), str(path), input_names=["features"], output_names=["pooled", "logits"],
                          dynamo=True, external_data=True)
    return path


def ort_runner(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: tuple(session.run(None, {"features": x.numpy()}))


def ort_int8(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("ast-int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=True)
    return out


def openvino_runner(path: Path):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return lambda x: tuple(v for v in compiled(x.numpy()).values())


def build(name: str, model, head: Head, x: torch.Tensor, tmp: Path, onnx: dict):
    if name.startswith("torch-"):
        from audiosearch.model import Model

        return torch_runner(model if name == "torch-fp32" else Model(model.name, device="cpu",
                                                                     precision=name.split("-")[1]))
    if "fp32" not in onnx:
        onnx["fp32"] = onnx_file(head, x, tmp)
    if name == "ort-fp32":
        return ort_runner(onnx["fp32"])
    if name == "ort-int8":
        return ort_runner(ort_int8(onnx["fp32"]))
    if name == "openvino-fp32":
        return openvino_runner(onnx["fp32"])
    raise ValueError(name)


def fidelity(ref: tuple, got: tuple) -> tuple[float, float, int]:
    a = ref[0] / np.linalg.norm(ref[0], axis=1, keepdims=True)
    b = got[0] / np.linalg.norm(got[0], axis=1, keepdims=True)
    cos = (a * b).sum(1)
    top = [len(set(np.argsort(-r)[:5]) & set(np.argsort(-g)[:5])) for r, g in zip(ref[1], got[1])]
    return float(cos.min()), float(cos.mean()), min(top)


def main(argv: list[str] | None = None) -> None:
    from audiosearch.model import Model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    print(cpu_report(), flush=True)
    model = Model(str(checkpoint(CACHE)), device="cpu", precision="fp32")
    head = Head(model.net).eval()
    x = features(model, args.batch)
    ref = None
    print(f"{'backend':14} {'segments/s':>10} {'vs fp32':>8} {'CPU s/seg':>9} {'vs fp32':>8} "
          f"{'cos min':>8} {'cos mean':>8} {'top5 min':>8}", flush=True)
    base = base_cpu = None
    with tempfile.TemporaryDirectory() as tmp:
        onnx: dict = {}
        for name in args.only.split(","):
            try:
                run = build(name, model, head, x, Path(tmp), onnx)
            except ImportError as e:
                print(f"{name:14} not installed ({e.name})", flush=True)
                continue
            got = run(x)  # warm-up, and the output scored
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.reps):
                run(x)
            segments = args.batch * args.reps
            rate, cpu_s = segments / (time.perf_counter() - start), (time.process_time() - cpu) / segments
            ref = got if ref is None else ref
            base = rate if base is None else base
            cmin, cmean, top = fidelity(ref, got)
            base_cpu = cpu_s if base_cpu is None else base_cpu
            print(f"{name:14} {rate:10.3f} {rate / base:7.2f}x {cpu_s:9.2f} {base_cpu / cpu_s:7.2f}x "
                  f"{cmin:8.4f} {cmean:8.4f} {top:6d}/5", flush=True)
            del run
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
