"""Hardware-aware widths: the width table, ``ChannelPruning(round_to="auto")`` and the CLI's
``--round-to auto``.

* The rounding cost and the chosen multiple follow the timings: a device whose times step at
  multiples of 16 gets 16, one whose times grow with every channel gets 1.
* A measured table is cached and read back; a damaged file is measured again.
* ``round_to="auto"`` rounds the removed model's kept counts to the table's multiple, and
  removal stays exact.
* The CLI resolves ``--round-to auto`` to an int, reports the table, and turns it off with
  ``--block-size``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.pruning import ChannelPruning, WidthTable, measure_width_table

from gate_states import assert_removal_matches_gates, random_gate_states
from prune_runs import fast_latency
from test_cli_trained_model import TINY_TRAINED

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

WIDTHS = list(range(40, 97))


def _table(time_of_width) -> WidthTable:
    seconds = {probe: [time_of_width(w) for w in WIDTHS] for probe in ("conv3x3", "linear")}
    return WidthTable(WIDTHS, seconds, {"device": "synthetic"})


def blocked_16(width: int) -> float:
    """Time of a kernel that works in blocks of 16 channels: every width costs its blocks."""
    return float(-(-width // 16))


def test_a_device_with_blocks_of_16_gets_16():
    table = _table(blocked_16)
    assert table.rounding_cost(16) == pytest.approx(1.0)
    assert table.rounding_cost(32) > 1.05
    assert table.best_multiple() == 16
    assert "channel multiple 16 on synthetic" in table.summary()


def test_a_device_where_every_channel_counts_gets_no_rounding():
    table = _table(lambda width: float(width))
    expected = math.exp(sum(math.log((w + 1) / w) for w in WIDTHS[:-1] if w % 2) / len(WIDTHS))
    assert table.rounding_cost(2) == pytest.approx(expected)
    assert table.best_multiple(tolerance=0.005) == 1
    assert table.best_multiple(tolerance=0.5) == 32


def test_the_coarsest_multiple_as_fast_as_the_fastest_wins():
    """Widths just past a multiple of 8 run slowly (a remainder loop): rounding up to 8 or 16 is
    faster than keeping them; 32 overshoots too far."""
    table = _table(lambda width: -(-width // 8) * 8 + (6.0 if width % 8 else 0.0))
    assert table.rounding_cost(8) < table.rounding_cost(2) < 1.0 < table.rounding_cost(32)
    assert table.best_multiple() == 8


def test_measured_tables_are_cached_and_a_damaged_file_is_measured_again(tmp_path, caplog):
    options = dict(widths=range(6, 11), rounds=1, spatial=2, cache_dir=tmp_path)
    first = measure_width_table(**options)
    assert not first.from_cache and first.path.parent == tmp_path
    assert first.widths == list(range(6, 11)) and set(first.seconds) == {"conv3x3", "conv1x1", "linear"}
    assert all(len(times) == 5 and min(times) > 0 for times in first.seconds.values())
    again = measure_width_table(**options)
    assert again.from_cache and again.seconds == first.seconds
    assert not measure_width_table(**{**options, "batch_size": 2}).from_cache  # another key
    first.path.write_text("{")
    with pytest.raises(PruningError, match="is not a dagprune width table"):
        WidthTable.load(first.path)
    assert not measure_width_table(**options).from_cache
    assert "measuring it again" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"widths": range(5, 6)}, "at least two consecutive"),
    ({"widths": [4, 6, 7]}, "at least two consecutive"),
    ({"rounds": 0}, "rounds must be a positive int"),
    ({"tolerance": float("nan")}, "tolerance must be a number >= 0"),
])
def test_bad_measurement_options_are_named(options, message, tmp_path):
    with pytest.raises(PruningError, match=message):
        measure_width_table(cache_dir=tmp_path, **options)


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 40, 3, padding=1)
        self.body = nn.Conv2d(40, 36, 3, padding=1)
        self.neck = nn.Conv2d(36, 12, 1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.neck(torch.relu(self.body(torch.relu(self.stem(x)))))))


def test_round_to_auto_rounds_the_removed_model_to_the_tables_multiple():
    torch.manual_seed(0)
    dag = dp.build_from_unstructured_module(Wide().eval())
    config = ChannelPruning(dag, (3, 6, 6), 0.999, 10, round_to="auto", width_table=_table(blocked_16))
    gated = config.prepare_for_pruning()
    assert config.round_to == 16
    inputs = (torch.randn(2, 3, 6, 6),)
    for _ in random_gate_states(config, seed=3, count=4):
        slim = assert_removal_matches_gates(config, gated, inputs)
        widths = {v.qualified_name: v.module.out_channels for v in slim.inner_vertices
                  if isinstance(v.module, nn.Conv2d)}
        assert widths["stem"] in (16, 32, 40) and widths["body"] in (16, 32, 36), widths
        assert 1 <= widths["neck"] <= 12  # smaller than the multiple: not rounded


class Narrow(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


def test_under_auto_a_group_narrower_than_two_multiples_rounds_finer_and_keeps_its_gate():
    torch.manual_seed(0)
    dag = dp.build_from_unstructured_module(Narrow().eval())
    auto = ChannelPruning(dag, (3, 6, 6), 0.999, 10, round_to="auto", width_table=_table(blocked_16))
    gated = auto.prepare_for_pruning()
    assert auto.round_to == 16 and [gate.block_size for gate in auto.gates] == [8, 8]
    for _ in random_gate_states(auto, seed=1, count=4):
        slim = assert_removal_matches_gates(auto, gated, (torch.randn(2, 3, 6, 6),))
        widths = [v.module.out_channels for v in slim.inner_vertices if isinstance(v.module, nn.Conv2d)]
        assert widths[0] in (8, 16) and widths[1] in (8, 16, 24), widths
    explicit = ChannelPruning(dag, (3, 6, 6), 0.999, 10, round_to=16)
    explicit.prepare_for_pruning()  # asked for 16 exactly: the 16-channel group has one block, no choice
    assert [group.size for group in explicit.prunable_groups] == [24]


@pytest.mark.parametrize("options, message", [
    ({"round_to": "Auto"}, 'round_to must be a positive int, got \'Auto\' \\(or "auto"\\)'),
    ({"round_to": "auto", "block_size": 4}, "both round the kept counts"),
    ({"round_to": 8, "width_table": _table(blocked_16)}, "width_table is used by round_to='auto' only"),
    ({"round_to": "auto", "width_table": {"widths": WIDTHS}}, "must be a WidthTable, got .*dict"),
])
def test_bad_round_to_options_are_named(options, message):
    dag = dp.build_from_unstructured_module(Wide().eval())
    with pytest.raises(PruningError, match=message):
        ChannelPruning(dag, (3, 6, 6), 0.5, 10, **options)


def test_cli_round_to_auto_is_the_default_and_reported(tmp_path, monkeypatch, capsys):
    fast_latency(monkeypatch)
    monkeypatch.setenv("DAGPRUNE_CACHE", str(tmp_path / "cache"))
    from dagprune_algorithms.pruning import width_table

    measured = []
    real = width_table.measure_width_table

    def measure_small(device=None, dtype=torch.float32, **options):
        measured.append(dtype)
        return real(device, dtype, widths=range(14, 19), rounds=1, spatial=2)

    monkeypatch.setattr(width_table, "measure_width_table", measure_small)
    out = tmp_path / "run"
    code = main(["prune", *TINY_TRAINED, "--out", str(out)])
    assert code in (0, 1), capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    table = WidthTable.load(report["round_to"]["width_table"]["path"])
    assert report["round_to"]["auto"] and report["round_to"]["value"] == table.best_multiple()
    assert report["arguments"]["round_to"] == table.best_multiple() and measured == [torch.float32]
    assert table.path.parent == tmp_path / "cache" / "latency"
    assert report["removal_max_relative_difference"] <= 1e-4

    blocked = tmp_path / "blocked"
    code = main(["prune", *TINY_TRAINED, "--out", str(blocked), "--block-size", "4"])
    assert code in (0, 1), capsys.readouterr().err
    report = json.loads((blocked / "report.json").read_text())
    assert report["round_to"] == {"value": 1, "auto": False, "width_table": None} and len(measured) == 1


def test_cli_round_to_must_be_an_int_or_auto(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["prune", *TINY_TRAINED, "--out", str(tmp_path / "run"), "--round-to", "eight"])
    assert exit_info.value.code == 2
    assert "expected an int or auto, got 'eight'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet18_dag():
    import timm

    torch.manual_seed(0)
    return dp.build_from_unstructured_module(timm.create_model("resnet18", num_classes=10).eval())


@pytest.mark.parametrize("round_to", [16, 32])
def test_calibration_with_blocks_lands_on_the_target(resnet18_dag, round_to):
    """Flipping channels in logit order alone stops where some group crosses a multiple, up to a
    block of a wide layer away; whole-block moves then land within half a percent."""
    for target in (0.3, 0.5, 0.7):
        config = ChannelPruning(resnet18_dag, (3, 32, 32), target, 10, round_to=round_to)
        config.prepare_for_pruning()
        assert config.calibrate_to_target() == pytest.approx(target, abs=0.005)
        for gate, group in zip(config.gates, config.prunable_groups):
            kept = int(gate.hard_mask().sum())
            assert kept % round_to == 0 or kept == group.size, (group.name, kept)
