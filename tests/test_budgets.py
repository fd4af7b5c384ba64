"""Budgets beyond FLOPs: the parameter budget predicts the slim model's parameter count exactly;
latency tables are measured once, read back from their cache, and give a differentiable expected
latency that never falls when a keep probability rises; ``dagprune prune --budget``."""

import json
import logging
import time

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import dagprune
from dagprune.errors import PruningError
from dagprune.ops import OPS
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.pruning import ChannelPruning, latency_table
from dagprune_algorithms.pruning.latency_table import LatencyTable, measure_latency_table
from gate_states import random_gate_states
from prune_runs import TINY, fast_latency
from zoo import ZOO, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HfStyleMlp(nn.Module):
    """A Llama-style decoder MLP block as Hugging Face writes it: token embeddings, RMSNorm,
    gated up/down projections without biases, a residual, a final norm and an LM head."""

    def __init__(self, vocab: int = 40, hidden: int = 16, intermediate: int = 24):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.input_layernorm, self.norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        hidden = self.embed_tokens(input_ids)
        x = self.input_layernorm(hidden)
        hidden = hidden + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.lm_head(self.norm(hidden))


def _timm_vit():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    return model, (torch.randn(1, 3, 32, 32),)


PARAMS_MODELS = {
    "conv_net": lambda: (ZOO["resnet_basic_blocks"].factory(seed=0),
                         tuple(make_example_inputs(ZOO["resnet_basic_blocks"], batch_size=1))),
    "timm_vit": _timm_vit,
    "hf_style_mlp": lambda: (HfStyleMlp(), (torch.randint(0, 40, (1, 7)),)),
}
"""Models whose parameter count the params budget must predict exactly."""


def _prepared(model, inputs, target: float = 0.5, **options) -> ChannelPruning:
    config = ChannelPruning(dagprune.build_from_unstructured_module(model), None, target, 100,
                            example_inputs=inputs, **options)
    config.prepare_for_pruning()
    return config


# ------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", PARAMS_MODELS)
def test_params_budget_predicts_the_slim_parameter_count_exactly(name):
    config = _prepared(*PARAMS_MODELS[name](), budget="params")
    total = sum(p.numel() for p in config.model.parameters())
    assert config.cost.approximate == [] and config.cost.total == total
    for _ in random_gate_states(config, seed=1, count=4):
        slim = config.remove_channels()
        kept = sum(p.numel() for p in slim.parameters())
        assert kept < total
        assert round(config.cost.predicted(config.kept_classes())) == kept
        assert config.current_hard_proportion() == pytest.approx(kept / total, abs=1e-12)
        hard = config._expected_flops.proportion(config._gate_set.hard_masks())  # what the loss sees
        assert hard.item() == pytest.approx(kept / total, abs=1e-5)


def test_params_of_a_layer_whose_removal_renames_them_are_flagged_approximate():
    model, inputs = OPS["multihead_attention"].example()
    config = _prepared(model, inputs, target=0.9, budget="params")
    assert config.cost.approximate == ["attention"]  # nn.MultiheadAttention -> separate projections


# ------------------------------------------------------------------------------ latency
class _OutputElements(TorchFunctionMode):
    """Counts the torch calls made and the elements of the tensors they return."""

    calls = elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.calls += 1
        self.elements += output.numel() if isinstance(output, torch.Tensor) else 0
        return output


def _fake_seconds(call, device, seconds_per_round, rounds=3):
    """A deterministic stand-in for the timer: a microsecond per torch call and a nanosecond per
    element it returns (so a whole model costs what its ops cost)."""
    with _OutputElements() as counted:
        call()
    return 1e-6 * counted.calls + 1e-9 * counted.elements


def _conv_net():
    return dagprune.build_from_unstructured_module(ZOO["resnet_basic_blocks"].factory(seed=0)), (3, 16, 16)


def test_latency_table_is_measured_once_then_read_from_its_cache(tmp_path, monkeypatch):
    dag, shape = _conv_net()
    timings = []
    monkeypatch.setattr(latency_table, "seconds_per_call", lambda *a, **k: timings.append(1) or _fake_seconds(*a))
    first = measure_latency_table(dag, shape, cache_dir=tmp_path, widths=4, progress=False)
    assert not first.from_cache and timings and first.path.parent == tmp_path
    assert first.fit_error() < 0.05  # the fake times add up; only the curves' slope floor differs

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached table was measured again")

    monkeypatch.setattr(latency_table, "seconds_per_call", no_timing)
    second = measure_latency_table(dag, shape, cache_dir=tmp_path, widths=4, progress=False)
    assert second.from_cache and second.path == first.path and second.curves == first.curves
    monkeypatch.setattr(latency_table, "seconds_per_call", _fake_seconds)
    other_batch = measure_latency_table(dag, shape, batch_size=2, cache_dir=tmp_path, widths=4, progress=False)
    assert not other_batch.from_cache and other_batch.path != first.path


def test_a_real_latency_table_is_quick_and_its_curves_rise(tmp_path):
    dag, shape = _conv_net()
    started = time.perf_counter()
    table = measure_latency_table(dag, shape, batch_size=2, cache_dir=tmp_path, widths=4,
                                  seconds_per_timing=2e-4, progress=False)
    assert time.perf_counter() - started < 20
    assert set(table.curves) == {vertex.name for vertex in dag.inner_vertices}
    assert all(np.all(np.diff(curve) > 0) for curve in table.curves.values())
    assert len(table.model_seconds) == 4 and min(table.model_seconds) > 0


def test_expected_latency_is_differentiable_and_never_falls_when_a_keep_probability_rises(tmp_path, monkeypatch):
    monkeypatch.setattr(latency_table, "seconds_per_call", _fake_seconds)
    dag, shape = _conv_net()
    table = measure_latency_table(dag, shape, batch_size=2, cache_dir=tmp_path, widths=4, progress=False)
    config = ChannelPruning(dag, shape, 0.8, 100, budget="latency", latency_table=table)
    config.prepare_for_pruning()
    assert config.current_hard_proportion() == pytest.approx(1.0)
    config.expected_proportion().backward()
    gradients = torch.cat([gate.logits.grad for gate in config.gates])
    assert (gradients > 0).all()  # every curve rises: no gate is left without a push
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(len(gradients), generator=generator) * 3
        raised = logits + torch.rand(len(gradients), generator=generator) * (
            torch.rand(len(gradients), generator=generator) < 0.3)
        low, high = (config._expected_flops.proportion(torch.sigmoid(x)).item() for x in (logits, raised))
        assert high >= low - 1e-6
    for _ in random_gate_states(config, seed=2, count=2):  # the loss's hard share is the one reported
        hard = config._expected_flops.proportion(config._gate_set.hard_masks()).item()
        assert hard == pytest.approx(config.current_hard_proportion(), abs=1e-5)


def test_latency_table_errors_name_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(latency_table, "seconds_per_call", _fake_seconds)
    dag, shape = _conv_net()
    table = measure_latency_table(dag, shape, cache_dir=tmp_path, widths=2, progress=False)
    other = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    with pytest.raises(PruningError, match=r"has no curve for .* measure one for this model"):
        ChannelPruning(other, (3, 8, 8), 0.5, 10, budget="latency", latency_table=table).prepare_for_pruning()
    with pytest.raises(PruningError, match="used by budget='latency' only"):
        ChannelPruning(dag, shape, 0.5, 10, latency_table=table)
    with pytest.raises(PruningError, match="latency_table must be a LatencyTable"):
        ChannelPruning(dag, shape, 0.5, 10, budget="latency", latency_table=str(table.path))
    with pytest.raises(PruningError, match=r"budget must be one of \('flops', 'params', 'latency'\)"):
        ChannelPruning(dag, shape, 0.5, 10, budget="memory")
    table.path.write_text("{not json")
    with pytest.raises(PruningError, match="is not a dagprune latency table .* delete it"):
        LatencyTable.load(table.path)
    with caplog.at_level(logging.WARNING):
        again = measure_latency_table(dag, shape, cache_dir=tmp_path, widths=2, progress=False)
    assert not again.from_cache and "measuring it again" in caplog.text


def test_unreachable_target_names_the_budget():
    with pytest.raises(PruningError, match="leaves .* of the parameters"):
        _prepared(*PARAMS_MODELS["hf_style_mlp"](), target=0.01, budget="params")


# ------------------------------------------------------------------------------ measured calibration
def _calibrated_resnet(target: float):
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(timm.create_model("resnet18", num_classes=10).eval())
    config = ChannelPruning(dag, (3, 32, 32), target, 10)
    config.prepare_for_pruning()
    config.calibrate_to_target()
    return config


def test_a_prediction_that_is_off_by_a_factor_is_corrected_by_measurement():
    from dagprune_algorithms.pruning.calibration import match_measured_share

    config = _calibrated_resnet(0.5)
    for gate in config.gates:
        gate.freeze()
    measure = lambda: 1.2 * config.current_hard_proportion()  # noqa: E731 (the prediction reads 20% low)
    records = match_measured_share(config, measure)
    assert records[0]["measured"] == pytest.approx(0.6, abs=0.01) and records[0]["aim"] < 0.45
    assert abs(records[-1]["measured"] - 0.5) <= 0.02 * 0.5 and records[-1]["aim"] is None
    assert measure() == pytest.approx(records[-1]["measured"])  # the gates of that round are kept
    assert all(gate.frozen for gate in config.gates)
    assert torch.equal(torch.cat([g.frozen_mask for g in config.gates]), config._gate_set.masks_for_logits(
        torch.cat([g.logits.detach() for g in config.gates])))


def test_the_round_measured_nearest_the_target_is_kept():
    from dagprune_algorithms.pruning.calibration import match_measured_share

    config = _calibrated_resnet(0.5)
    first = [g.logits.detach().clone() for g in config.gates]
    readings = iter([0.53, 0.30, 0.70, 0.60])  # every recalibration measures worse
    records = match_measured_share(config, lambda: next(readings), rounds=3)
    assert [r["measured"] for r in records] == [0.53, 0.30, 0.70, 0.60]
    assert all(torch.equal(g.logits, logits) for g, logits in zip(config.gates, first))


def test_a_measured_share_that_is_not_proportional_to_the_prediction_is_bracketed():
    from dagprune_algorithms.pruning.calibration import match_measured_share

    config = _calibrated_resnet(0.5)
    # cubic: scaling the aim by measured / predicted overshoots and swings (0.60, 0.35, 1.0...)
    measure = lambda: 0.6 * (config.current_hard_proportion() / 0.5) ** 3  # noqa: E731
    records = match_measured_share(config, measure)
    assert records[0]["measured"] == pytest.approx(0.6, abs=0.02)
    assert abs(records[-1]["measured"] - 0.5) <= 0.02 * 0.5, records
    assert all(abs(r["measured"] - 0.5) < 0.2 for r in records), records  # no swing past the bracket
    assert measure() == pytest.approx(records[-1]["measured"])


def test_the_next_aim_brackets_the_target_and_falls_back_when_noise_inverts_the_rounds():
    from dagprune_algorithms.pruning.calibration import next_aim

    assert next_aim([(0.5, 0.6), (0.4, 0.4)], 0.5) == pytest.approx(0.45)
    assert next_aim([(0.5, 0.6), (0.4, 0.4), (0.48, 0.55)], 0.5) == pytest.approx(0.4 + 0.08 * 0.1 / 0.15)
    # the round predicted lower measured higher: proportional from the round measured nearest
    assert next_aim([(0.4, 0.55), (0.5, 0.42)], 0.5) == pytest.approx(0.5 * 0.4 / 0.55)
    assert next_aim([(0.3, 0.9)], 0.5, floor=0.2) == pytest.approx(0.2)
    # a side held for a round counts half as far from the target (Illinois)
    assert next_aim([(0.5, 0.6), (0.4, 0.4)], 0.5, held={0.5: 1}) == pytest.approx(0.4 + 0.1 * 0.1 / 0.15)


def test_a_mismeasured_first_model_does_not_hold_the_search():
    from dagprune_algorithms.pruning.calibration import match_measured_share

    config = _calibrated_resnet(0.5)
    calls = []

    def measure():  # 1.2 x the prediction, but the first timing was disturbed (slim read slower than the original)
        calls.append(config.current_hard_proportion())
        return 1.05 if len(calls) == 1 else 1.2 * calls[-1]

    records = match_measured_share(config, measure)
    assert records[0]["measured"] == 1.05
    assert abs(records[-1]["measured"] - 0.5) <= 0.02 * 0.5, records
    assert measure() == pytest.approx(records[-1]["measured"])


# ------------------------------------------------------------------------------ the command
def test_prune_with_a_params_budget_reports_the_exact_parameter_share(tmp_path, capsys, monkeypatch):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    code = main(["prune", *TINY, "--no-reference", "--budget", "params", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1), report  # 1: a missed target in 6 steps is a failed check
    baseline, pruned = report["rows"][0], report["rows"][-1]
    assert report["budget"]["name"] == "params"
    assert report["budget"]["reached"] == pytest.approx(pruned["params"] / baseline["params"], abs=1e-12)
    printed = capsys.readouterr().out
    assert f"params {pruned['params'] / baseline['params']:.3f}" in printed and "budget params: target 0.5" in printed


def test_prune_with_a_latency_budget_caches_its_table(tmp_path, capsys, monkeypatch):
    fast_latency(monkeypatch)
    monkeypatch.setattr(latency_table, "seconds_per_call", _fake_seconds)
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main(["prune", *TINY, "--no-reference", "--budget", "latency", "--latency-cache", str(cache),
                 "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1), report
    assert report["budget"]["name"] == "latency" and report["budget"]["latency_table"]["path"].startswith(str(cache))
    assert len(list(cache.glob("*.json"))) == 1
    assert "(predicted by the latency table); measured latency" in capsys.readouterr().out
    calibration = report["budget"]["measured_calibration"]  # the fake timer measures 1.0 every time
    assert calibration and all(entry["measured"] == pytest.approx(1.0) for entry in calibration)


def test_the_latency_budget_reports_the_share_timed_in_alternation(tmp_path, capsys, monkeypatch):
    from dagprune_algorithms.app import latency

    largest, slowdown = [0], [0]

    def drifting(model, x, device):  # a pass takes its parameter count times a slowdown that grows
        size = sum(p.numel() for p in model.parameters())  # each time the largest model runs
        largest[0] = max(largest[0], size)
        slowdown[0] += size == largest[0]
        return float(size * slowdown[0])

    monkeypatch.setattr(latency, "_timed_pass_ms", drifting)
    monkeypatch.setattr(latency_table, "seconds_per_call", _fake_seconds)
    out = tmp_path / "run"
    code = main(["prune", *TINY, "--no-reference", "--budget", "latency", "--latency-cache", str(tmp_path / "cache"),
                 "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1), report
    baseline, pruned = report["rows"][0], report["rows"][-1]
    share = report["budget"]["measured_latency_share"]
    assert share == pytest.approx(pruned["params"] / baseline["params"])  # not skewed by the drift
    assert pruned["latency_ms"] / baseline["latency_ms"] != pytest.approx(share)  # the rows' ratio is
    assert f"measured latency {share:.3f} of the baseline's (batch 32, cpu, timed in alternation)" in \
        capsys.readouterr().out


def test_latency_share_pairs_the_passes_of_a_round(monkeypatch):
    from dagprune_algorithms.app import latency

    big, small = nn.Linear(8, 8), nn.Linear(8, 2)
    times = iter([9.0, 1.0,  # warm-up round
                  10.0, 5.0, 40.0, 20.0, 20.0, 12.0, 10.0, 4.0])  # a slow spell in round 2

    monkeypatch.setattr(latency, "_timed_pass_ms", lambda model, x, device: next(times))
    share = latency.measure_latency_share(small, big, (8,), batch_size=2, warmup=1, rounds=4)
    assert share.median == pytest.approx(0.5) and share.rounds == 4  # ratios 0.5, 0.5, 0.6, 0.4
    assert (share.p25, share.p75) == (pytest.approx(0.475), pytest.approx(0.525))
    with pytest.raises(ValueError, match="rounds >= 1"):
        latency.measure_latency_share(small, big, (8,), rounds=0)


@pytest.mark.parametrize("arguments, message", [
    (["--budget", "memory"], "argument --budget: invalid choice: 'memory'"),
    (["--budget", "params", "--method", "l1"], "--budget params applies to --method dag only"),
    (["--latency-cache", "somewhere"], "--latency-cache applies to --budget latency only"),
    (["--budget", "latency", "--latency-cache", "FILE"], "is a file; give a directory"),
])
def test_bad_budget_options_give_one_line(tmp_path, capsys, arguments, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    arguments = [str(a_file) if argument == "FILE" else argument for argument in arguments]
    try:
        code = main(["prune", *TINY, "--no-reference", "--out", str(tmp_path / "run"), *arguments])
    except SystemExit as exit:  # argparse's own errors (an unknown choice)
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error
    assert not (tmp_path / "run" / "baseline.pt").exists()


def test_an_eval_forward_after_calibration_uses_the_new_masks():
    config = _calibrated_resnet(0.7)
    gated = config.pruning_model.eval()
    x = torch.randn(2, 3, 32, 32)
    gated(x)  # the eval-mode masks are cached here
    config.calibrate_to_target(0.4)
    slim = config.remove_channels().eval()
    assert torch.allclose(gated(x), slim(x), rtol=1e-4, atol=1e-5)
