"""The CNN workload: a small ResNet (Conv2d + BatchNorm2d + ReLU blocks, residual adds) on real digits.

    python benchmarks/cnn.py             # trains (~25 s on 2 cores), quantizes, prints the table

Data: scikit-learn's bundled ``load_digits`` (1797 real 8x8 handwritten digits, offline), scaled to
[0, 1] and upsampled to 16x16; a stratified 80/20 split (1437 train, 360 test). Fidelity is top-1
agreement with the float model on the test set and the accuracy drop in points.

``train_cnn`` and ``measure_cnn`` are what ``benchmarks/run.py`` calls. Rows: float, float with
BatchNorm folded (the same network, what our int8 model starts from), mono-quant int8 static and
dynamic, and torch.ao's static int8 (FX graph mode, x86 backend, conv+bn+relu fused) as the peer.
torch.ao's dynamic quantization has no convolution path (it quantizes Linear/RNN layers only), so
it has no row here. torch.ao is imported in this file only, as a peer; the library never uses it.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from timing import round_robin_ms  # benchmarks/ is on sys.path when this file runs
from torch import nn

import mono_quant as mq

THREADS = 2
IMAGE_SIZE = 16
BATCHES = (1, 32)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, add the (projected) input, relu."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class ResNetDigits(nn.Module):
    """Stem (32 ch) and three basic blocks (32, 64, 128 ch; 16x16 -> 8x8 -> 4x4), average pool, linear head.

    Example:
        >>> ResNetDigits()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, test_x, test_y)``: digits as ``[N, 1, 16, 16]`` floats in [0, 1], 80/20 stratified.

    Example:
        >>> train_x, train_y, test_x, test_y = digits_images()
        >>> tuple(train_x.shape), tuple(test_x.shape), int(test_y.max())
        ((1437, 1, 16, 16), (360, 1, 16, 16), 9)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def train_cnn(
    seconds_budget: float = 40.0, epochs: int = 6, seed: int = 0, widths: tuple[int, int, int] = (32, 64, 128)
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Train ``ResNetDigits(widths)`` on digits for ``epochs`` (stopping early past ``seconds_budget``); eval mode.

    Measured here (2 shared threads): widths (32, 64, 128) ~25 s for 6 epochs, (16, 32, 64) ~5 s at
    99.7% test accuracy.

    Returns ``(model, test_x, test_y, calib_batches)``; the calibration batches (8 x 32 images) come
    from the training split. Small random shifts augment the training images.

    Example:
        >>> model, test_x, test_y, calib = train_cnn(seconds_budget=2.0, epochs=1, widths=(8, 8, 8))
        >>> model.training, len(calib), tuple(calib[0].shape)
        (False, 8, (32, 1, 16, 16))
    """
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_images(seed)
    model = ResNetDigits(widths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(train_x) + 31) // 32
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            shift = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(train_x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if time.perf_counter() - start > seconds_budget:
            break
    model.eval()
    calib_order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + 1))[:256]
    calib_batches = list(train_x[calib_order].split(32))
    return model, test_x, test_y, calib_batches


def predictions(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Top-1 class of every row of ``x``, run ``batch`` at a time.

    Example:
        >>> predictions(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), torch.zeros(3, 1, 16, 16)).shape
        torch.Size([3])
    """
    with torch.inference_mode():
        return torch.cat([model(chunk).argmax(-1) for chunk in x.split(batch)])


def torch_ao_static(model: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """torch.ao's FX-graph static int8 (x86 backend: fbgemm/oneDNN quantized conv, conv+bn+relu fused)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib_batches[0],))
        with torch.inference_mode():
            for batch in calib_batches:
                prepared(batch)
        return convert_fx(prepared)


Variant = tuple[str, str, "nn.Module | None", float, str]


def _variants(model: nn.Module, calib_batches: list[torch.Tensor]) -> list[Variant]:
    """``(mode, library, model or None, quantize seconds, note)`` for every row."""
    out: list[Variant] = [("float", "torch", model, 0.0, "")]
    start = time.perf_counter()
    folded, pairs = mq.fold_batchnorm(model)
    out.append(("float, BN folded", "mono-quant", folded, time.perf_counter() - start, f"{len(pairs)} BN folded"))
    start = time.perf_counter()
    static = mq.quantize(model, mode="static", calibration_data=calib_batches).model
    note = "fused graph: oneDNN u8 conv chain, ReLU/add post-ops" if "forward" in vars(static) else "oneDNN u8 conv"
    out.append(("int8 static", "mono-quant", static, time.perf_counter() - start, note))
    start = time.perf_counter()
    dynamic = mq.quantize(model, mode="dynamic").model
    fused = "forward" in vars(dynamic)
    note = f"{'fused graph' if fused else 'oneDNN u8 conv'}, per-call input scale"
    out.append(("int8 dynamic", "mono-quant", dynamic, time.perf_counter() - start, note))
    try:
        start = time.perf_counter()
        ao = torch_ao_static(model, calib_batches)
        out.append(("int8 static", "torch.ao (peer)", ao, time.perf_counter() - start, "FX, x86, fused conv-bn-relu"))
    except Exception as err:  # deprecated API: report instead of failing
        out.append(("int8 static", "torch.ao (peer)", None, 0.0, f"failed: {type(err).__name__}: {err}"[:120]))
    out.append(("int8 dynamic", "torch.ao (peer)", None, 0.0, "no conv path in torch.ao dynamic quantization"))
    return out


def measure_cnn(
    model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, calib_batches: list[torch.Tensor], iters: int = 30
) -> list[dict]:
    """Quantize ``model`` each way and measure it against float in this one run (2 threads).

    One dict per (mode, library, batch in ``BATCHES``): ``workload``, ``mode``, ``library``, ``batch``,
    ``median_ms``, ``ratio_to_float`` (mode ms / float ms: below 1.0 is faster), ``agreement`` (top-1
    agreement with float over the test set), ``accuracy``, ``accuracy_drop`` (points), ``quantize_s``,
    ``note``. Rows a peer cannot produce have ``median_ms`` ``None`` and say why in ``note``.

    Example:
        >>> model = ResNetDigits().eval()
        >>> rows = measure_cnn(model, torch.rand(8, 1, 16, 16), torch.zeros(8, dtype=torch.int64),
        ...                    [torch.rand(4, 1, 16, 16)], iters=2)
        >>> [(r["mode"], r["batch"]) for r in rows][:4]
        [('float', 1), ('float', 32), ('float, BN folded', 1), ('float, BN folded', 32)]
    """
    torch.set_num_threads(THREADS)
    float_pred = predictions(model, test_x)
    float_acc = (float_pred == test_y).float().mean().item()
    inputs = {b: test_x[:b] if len(test_x) >= b else test_x[:1].expand(b, -1, -1, -1).contiguous() for b in BATCHES}
    variants = _variants(model, calib_batches)
    timed = {b: round_robin_ms({str(i): (lambda v=v[2], x=inputs[b]: v(x)) for i, v in enumerate(variants)
                                if v[2] is not None}, iters) for b in BATCHES}  # fmt: skip
    rows = []
    for index, (mode, library, variant, seconds, note) in enumerate(variants):
        pred = None if variant is None else predictions(variant, test_x)
        for batch in BATCHES:
            row = {
                "workload": "cnn (digits ResNet)",
                "mode": mode,
                "library": library,
                "batch": batch,
                "median_ms": None,
                "ratio_to_float": None,
                "agreement": None,
                "accuracy": None,
                "accuracy_drop": None,
                "quantize_s": round(seconds, 3),
                "note": note,
            }
            if variant is not None:
                ms = timed[batch][str(index)]
                accuracy = (pred == test_y).float().mean().item()
                row.update(
                    median_ms=ms,
                    ratio_to_float=ms / timed[batch]["0"],
                    agreement=(pred == float_pred).float().mean().item(),
                    accuracy=accuracy,
                    accuracy_drop=100 * (float_acc - accuracy),
                )
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of ``measure_cnn`` rows.

    Example:
        >>> print(format_table([{"mode": "float", "library": "torch", "batch": 1, "median_ms": 1.0,
        ...     "ratio_to_float": 1.0, "agreement": 1.0, "accuracy": 0.98, "accuracy_drop": 0.0,
        ...     "quantize_s": 0.0, "note": ""}]).splitlines()[2])
        | float | torch | 1 | 1.000 | 1.00x | 100.0% | 98.0% | +0.00 | 0.00 |  |
    """
    header = (
        "| mode | library | batch | median ms | x float | top-1 agreement | accuracy | acc. drop (pt) | quantize s "
        "| note |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"| {r['mode']} | {r['library']} | {r['batch']} | - | - | - | - | - | - | {r['note']} |")
            continue
        lines.append(
            f"| {r['mode']} | {r['library']} | {r['batch']} | {r['median_ms']:.3f} | {r['ratio_to_float']:.2f}x | "
            f"{100 * r['agreement']:.1f}% | {100 * r['accuracy']:.1f}% | {r['accuracy_drop']:+.2f} | "
            f"{r['quantize_s']:.2f} | {r['note']} |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model, test_x, test_y, calib = train_cnn()
    print(f"trained in {time.perf_counter() - start:.1f} s on {THREADS} threads")
    print(format_table(measure_cnn(model, test_x, test_y, calib)))


if __name__ == "__main__":
    main()
