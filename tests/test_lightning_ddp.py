"""QuantizationCallback under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``, run in a subprocess.

Checks: the all-reduced observer statistics equal one process observing the union of the validation data,
int4 GPTQ input statistics are all-reduced so both ranks fit the identical model (that of one process on the union),
exactly one file is written, a failing gate raises on both ranks without hanging, and
``on_violation="fallback"`` takes the same decisions on both ranks and writes one file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant as mq

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torchmetrics.classification import MulticlassAccuracy

    import mono_quant as mq
    from mono_quant_lightning import QuantizationCallback, QuantizationGateError

    out, case = Path(sys.argv[1]), sys.argv[2]
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)


    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            if case == "fail":  # ridge classifier + a huge weight on pixel 0 (always 0): int8 zeroes the rest
                features = torch.cat([x[:1000], torch.ones(1000, 1)], 1).double()
                ridge = features.T @ features + 1e-3 * torch.eye(65, dtype=torch.float64)
                onehot = nn.functional.one_hot(y[:1000], 10).double()
                solution = torch.linalg.solve(ridge, features.T @ onehot).float()
                self.net = nn.Sequential(nn.Linear(64, 10))
                with torch.no_grad():
                    self.net[0].weight.copy_(solution[:64].T)
                    self.net[0].bias.copy_(solution[64])
                    self.net[0].weight[:, 0] = 1e4
            if case == "fallback":  # random ReLU features of the duplicated pixels, a ridge head, an outlier on
                first = nn.Linear(128, 128)  # the always-zero pixel 0 that breaks int4 (not int8)
                with torch.no_grad():
                    first.weight[:, 0] = 1.0
                hidden = torch.relu(first(torch.cat([x[:1000], x[:1000]], 1))).detach()
                features = torch.cat([hidden, torch.ones(1000, 1)], 1).double()
                ridge = features.T @ features + 0.1 * torch.eye(129, dtype=torch.float64)
                onehot = nn.functional.one_hot(y[:1000], 10).double()
                solution = torch.linalg.solve(ridge, features.T @ onehot).float()
                head = nn.Linear(128, 10)
                with torch.no_grad():
                    head.weight.copy_(solution[:128].T)
                    head.bias.copy_(solution[128])
                self.net = nn.Sequential(first, nn.ReLU(), head)
            if case == "monitor":
                self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

        def forward(self, x):
            return self.net(torch.cat([x, x], 1) if case == "fallback" else x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            out = self(batch[0])
            if case == "monitor":  # the user's own metric, logged the usual way
                self.val_acc(out, batch[1])
                self.log("val_acc", self.val_acc)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay at their seeded values


    # 256 validation samples, batch 32: each rank gets 4 whole batches, no padding duplicates.
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    val = DataLoader(TensorDataset(x[1000:1256], y[1000:1256]), batch_size=32)
    metric = MulticlassAccuracy(num_classes=10, average="micro") if case not in ("stats", "monitor", "gptq") else None
    options = dict(dtype="int4", on_violation="fallback", max_drop=0.02) if case == "fallback" else {}
    if case == "monitor":
        options = dict(monitor="val_acc", max_drop=0.02)
    if case == "gptq":
        options = dict(config=mq.QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32))
    cb = QuantizationCallback(**{**dict(observer="histogram", calibration_batches=100, metric=metric, max_drop=0.01,
                                        export_dir=out / "export", verbose=False), **options})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, num_sanity_val_steps=0,
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, default_root_dir=out)
    try:
        trainer.fit(Model(), train, val)
    except QuantizationGateError as err:
        (out / f"raised_rank{trainer.global_rank}").write_text(str(err))
        sys.exit(3)
    if case == "fallback":
        b = cb.budget
        seen = dict(moves=b.moves, evaluations=b.evaluations, float_score=b.float_score, final_score=b.final_score,
                    quantized_score=b.quantized_score, reached=b.reached, sensitivity=[r.layer for r in b.sensitivity],
                    drop=cb.drop, export=str(cb.export_path))
        (out / f"fallback_rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    if case == "monitor":
        d = cb.decision
        seen = dict(float_score=d.float_score, quantized_score=d.quantized_score, passed=d.passed, drop=d.drop)
        (out / f"monitor_rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    if case == "gptq":
        torch.save(cb.result.model.state_dict(), out / f"gptq_model_rank{trainer.global_rank}.pt")
        torch.save(cb.state_dict()["input_statistics"], out / f"gptq_statistics_rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        torch.save(cb.state_dict()["statistics"], out / "ddp_statistics.pt")
    """
)


def run_ddp(tmp_path: Path, case: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), case],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_statistics_equal_single_process_and_one_file(tmp_path):
    proc = run_ddp(tmp_path, "stats")
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert files == ["export/model.quant.report.txt", "export/model.quant.safetensors"]
    ddp = torch.load(tmp_path / "ddp_statistics.pt", weights_only=True)

    # One process, the same seeded weights, the union of both ranks' validation data.
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[1000:1256] / 16.0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    calibrator = mq.Calibrator({"net.0": net[0], "net.2": net[2]}, mq.QuantizationConfig(observer="histogram"))
    calibrator.run(net, list(x.split(32)))
    single = calibrator.state_dict()
    assert sorted(ddp) == sorted(single)
    for layer, state in single.items():
        assert int(ddp[layer]["batches"]) == 8
        for key in ("min_val", "max_val", "range_exp", "counts"):
            assert torch.equal(ddp[layer][key], state[key]), (layer, key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_failing_gate_raises_on_both_ranks(tmp_path):
    proc = run_ddp(tmp_path, "fail")
    assert proc.returncode != 0
    assert (tmp_path / "raised_rank0").is_file(), proc.stderr[-4000:]
    assert (tmp_path / "raised_rank1").is_file(), proc.stderr[-4000:]
    assert "failed the gate" in (tmp_path / "raised_rank1").read_text()
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_fallback_takes_the_same_decisions_on_both_ranks(tmp_path):
    import json

    from sklearn.datasets import load_digits

    proc = run_ddp(tmp_path, "fallback")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"fallback_rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # same scores (synced metric), same ranking, same moves, same path
    assert rank0["reached"] and rank0["moves"] and rank0["float_score"] - rank0["quantized_score"] > 0.02
    assert rank0["evaluations"] == 2 + len(rank0["moves"])  # one kept step per move, no re-rank
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert files == ["export/model.quant.report.txt", "export/model.quant.safetensors"]

    # The scores were all-reduced: the exported model scores the union of both shards (256 items) exactly so.
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[1000:1256] / 16.0
    y = torch.tensor(digits.target)[1000:1256]
    skeleton = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    wrapper = nn.Module()
    wrapper.net = skeleton
    q = mq.load(tmp_path / "export" / "model.quant.safetensors", model=wrapper)
    with torch.inference_mode():
        accuracy = (q.net(torch.cat([x, x], 1)).argmax(1) == y).float().mean().item()
    assert accuracy == rank0["final_score"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_monitor_gates_on_the_synced_logged_metric(tmp_path):
    import json

    from sklearn.datasets import load_digits

    proc = run_ddp(tmp_path, "monitor")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"monitor_rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0["passed"]
    # val_acc was computed by the module's own metric, synced over both shards: the whole 256 items.
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[1000:1256] / 16.0
    y = torch.tensor(digits.target)[1000:1256]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.inference_mode():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert rank0["float_score"] == pytest.approx(accuracy, abs=1e-6)
    q = mq.load(tmp_path / "export" / "model.quant.safetensors", model=_wrap(net))
    with torch.inference_mode():
        q_accuracy = (q.net(x).argmax(1) == y).float().mean().item()
    assert rank0["quantized_score"] == pytest.approx(q_accuracy, abs=1e-6)


def _wrap(net: nn.Module) -> nn.Module:
    wrapper = nn.Module()
    wrapper.net = net
    return wrapper


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_gptq_fits_the_identical_model_on_every_rank(tmp_path):
    from sklearn.datasets import load_digits

    proc = run_ddp(tmp_path, "gptq")
    assert proc.returncode == 0, proc.stderr[-4000:]
    models = [torch.load(tmp_path / f"gptq_model_rank{r}.pt", weights_only=True) for r in (0, 1)]
    stats = [torch.load(tmp_path / f"gptq_statistics_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(models[0]) == sorted(models[1]) and "net.0.weight_packed" in models[0]
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])  # bit-identical on both ranks
    assert all(torch.equal(stats[0][n][k], stats[1][n][k]) for n in stats[0] for k in stats[0][n])

    # One process, the same seeded weights, the union of both ranks' validation data (256 rows).
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[1000:1256] / 16.0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    wrapper = _wrap(net)
    config = mq.QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32)
    collector = mq.StatisticsCollector(mq.fitted_layers(wrapper, config), config)
    collector.run(wrapper.net, list(x.split(32)))
    single = collector.state_dict()
    assert sorted(stats[0]) == sorted(single) == ["net.0", "net.2"]
    for layer, state in single.items():
        assert int(stats[0][layer]["rows"]) == 256
        for key in ("xtx", "abs_sum", "abs_max"):  # sums in another order: equal within float64 rounding
            torch.testing.assert_close(stats[0][layer][key], state[key], rtol=1e-12, atol=1e-12)
    reference = mq.quantize(wrapper, config, input_statistics=collector.statistics()).model.state_dict()
    for key in ("net.0.weight_packed", "net.2.weight_packed"):
        same = (models[0][key] == reference[key]).float().mean().item()
        assert same > 0.99, (key, same)  # int32 words of 8 codes: a tie rounded differently flips one word
    for key in ("net.0.weight_scale", "net.2.weight_scale"):
        torch.testing.assert_close(models[0][key], reference[key])
