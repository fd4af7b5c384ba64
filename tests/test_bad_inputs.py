"""A bounded sample of ``scripts/bad_inputs.py``'s catalogue, run in-process: each bad input gives
exit code 2 (commands) or a dagprune exception (Python calls) with a one-line message and no
traceback."""

import pytest

from script_modules import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = ["lr_negative", "seed_negative", "device_unknown", "steps_not_a_number", "out_below_a_file",
          "data_dir_all_corrupt", "units_output_below_a_file", "convert_a_file", "pruning_not_a_dag",
          "pruning_proportion_above_one", "convert_data_parallel", "load_missing_directory"]
"""Cases that answer within seconds and depend only on code this sample is meant to guard."""


def catalogue():
    return load_script("bad_inputs.py")


@pytest.mark.parametrize("name", SAMPLE)
def test_a_bad_input_gets_one_clean_line(tmp_path, name):
    module = catalogue()
    case = next(case for case in module.CASES if case.name == name)
    outcome = module.run_in_process(case, tmp_path)
    assert outcome.as_expected, (outcome.result, outcome.message)
    assert not outcome.traceback and outcome.message and "\n" not in outcome.message
    if case.command is not None:
        assert outcome.result == "exit 2" and outcome.message.startswith(f"dagprune {case.command[0]}: error: ")
    else:
        assert outcome.result.startswith("dagprune.errors.")


def test_the_catalogue_is_large_named_uniquely_and_reported():
    module = catalogue()
    names = [case.name for case in module.CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert all((case.command is None) != (case.code is None) for case in module.CASES)
    report = module.REPORT.read_text()
    missing = [case.description for case in module.CASES if f"| {case.description} |" not in report]
    assert not missing, f"rerun scripts/bad_inputs.py: {missing}"
