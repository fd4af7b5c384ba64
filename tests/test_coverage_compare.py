"""``scripts/coverage_compare.py``: a partial re-sweep set against the committed table."""

from __future__ import annotations

import json

from sample_params import sweep_script

compare = sweep_script("coverage_compare.py")

_EXACT = dict.fromkeys(compare.CHECKS, True)


def test_counts_raised_lowered_failed_and_thresholds(tmp_path):
    before = {"models": [{"name": "a", "max_removable_proportion": 0.4}, {"name": "b", "max_removable_proportion": 0.8},
                         {"name": "c", "max_removable_proportion": 0.7}, {"name": "d", "max_removable_proportion": 0.6}],
              "summary": {"code_versions": {"abc1234": 4}}}
    records = [{"name": "a", "max_removable_proportion": 0.95, "git_head": "def5678", **_EXACT},
               {"name": "b", "max_removable_proportion": 0.5, "git_head": "def5678", **_EXACT},
               {"name": "c", "error": "convert: boom", "git_head": "def5678"},
               {"name": "d", "max_removable_proportion": 0.6, "git_head": "def5678", **_EXACT, "removal_exact": False},
               {"name": "e", "max_removable_proportion": 1.0, "git_head": "def5678", **_EXACT}]  # not in the table
    (tmp_path / "before.json").write_text(json.dumps(before))
    (tmp_path / "after.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    compare.main(["--before", str(tmp_path / "before.json"), "--after", str(tmp_path / "after.jsonl"),
                  "--out", str(tmp_path / "out.md")])
    text = (tmp_path / "out.md").read_text()
    assert "(commit abc1234); after: commit def5678" in text
    assert "- models: 4; every check passed: 2; failed: 1" in text
    assert "- raised by more than 0.005: 1; lowered: 1" in text
    assert "- at or above 0.5 removable: 3 before, 3 after" in text
    assert "- at or above 0.9 removable: 0 before, 1 after" in text
    assert "| d | 0.600 | 0.600 | checks [True, True, False, True] |" in text
    assert "| c | 0.700 | - | failed: convert: boom |" in text


def test_an_earlier_sweep_as_before(tmp_path):
    earlier = [{"name": "a", "max_removable_proportion": 0.8, "git_head": "abc1234", **_EXACT},
               {"name": "a", "max_removable_proportion": 0.7, "git_head": "abc1234", **_EXACT},  # its last record counts
               {"name": "b", "max_removable_proportion": 0.9, "git_head": "abc1234", **_EXACT}]
    later = [{"name": "a", "max_removable_proportion": 0.99, "git_head": "def5678", **_EXACT}]
    (tmp_path / "before.jsonl").write_text("\n".join(json.dumps(r) for r in earlier))
    (tmp_path / "after.jsonl").write_text("\n".join(json.dumps(r) for r in later))
    compare.main(["--before", str(tmp_path / "before.jsonl"), "--after", str(tmp_path / "after.jsonl"),
                  "--out", str(tmp_path / "out.md")])
    text = (tmp_path / "out.md").read_text()
    assert "(commit abc1234); after: commit def5678" in text
    assert "| a | 0.700 | 0.990 |" in text and "- models: 1;" in text
