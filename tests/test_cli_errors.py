"""`dagprune prune` checks every option before it trains, reports each user error as one line
with exit code 2, reports images it cannot decode, and exits with 1 when the pruned model misses
its FLOPs target."""

import json
import logging

import numpy as np
import pytest

from dagprune_algorithms.app.cli import main
from dagprune_algorithms.app.data import DataError, load_dataset
from prune_runs import TINY, fast_latency

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prune(out, *extra: str) -> int:
    """The exit code of a tiny ``dagprune prune`` (argparse's usage errors exit through SystemExit)."""
    try:
        return main(["prune", *TINY, "--no-reference", "--out", str(out), *extra])
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("arguments, message", [
    (["--lr", "-1"], "--lr must be a number > 0"),
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--gate-lr", "-1"], "--gate-lr must be a number > 0"),
    (["--gate-lr", "inf"], "--gate-lr must be a number > 0"),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "meta"], "--device meta: dagprune prune trains on cpu, cuda"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", str(2 ** 40)], "--seed must be in 0..4294967295"),
    (["--limit-train", "0"], "--limit-train must be positive"),
    (["--limit-val", "0"], "--limit-val must be positive"),
    (["--block-size", "0"], "--block-size must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--image-size", "0"], "--image-size must be positive"),
    (["--image-size", "1000000"], "--image-size 1000000 needs about"),
    (["--baseline-steps", "-1"], "--baseline-steps must be >= 0"),
    (["--finetune-steps", "-1"], "--finetune-steps must be >= 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--target", "nan"], "--target must be in (0, 1)"),
    (["--target", "1"], "--target must be in (0, 1)"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--baseline-checkpoint", "missing.pt"], "--baseline-checkpoint missing.pt: no such file"),
])
def test_every_bad_option_is_one_line_before_any_training(tmp_path, capsys, arguments, message):
    out = tmp_path / "run"
    assert prune(out, *arguments) == 2
    error = capsys.readouterr().err.strip()
    assert message in error, error
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert not out.exists()


@pytest.mark.parametrize("below", [False, True])
def test_out_pointing_at_or_below_a_file_is_refused(tmp_path, capsys, below):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    out = a_file / "run" if below else a_file
    assert prune(out) == 2
    error = capsys.readouterr().err.strip()
    assert f"--out {out}" in error and "a file" in error and len(error.splitlines()) == 1


def test_an_image_size_the_model_cannot_take_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert prune(out, "--model", "test_vit", "--image-size", "4") == 2
    error = capsys.readouterr().err.strip()
    assert "test_vit cannot run on 3x4x4 images" in error and "choose another --image-size" in error
    assert not (out / "baseline_training.ckpt").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--target", "0.001"], "cannot be reached"),
    (["--block-size", "4096"], "--block-size 4096: kept channel counts are multiples of it"),
])
def test_an_unreachable_target_fails_before_the_baseline(tmp_path, capsys, arguments, message):
    out = tmp_path / "run"
    assert prune(out, *arguments) == 2
    assert message in capsys.readouterr().err
    assert not (out / "baseline_training.ckpt").exists()


def test_a_missed_flops_target_exits_1_with_one_line_after_saving_everything(tmp_path, capsys, monkeypatch):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    assert prune(out, "--target", "0.2", "--block-size", "16") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("dagprune prune: check failed: FLOPs target missed")
    report = json.loads((out / "report.json").read_text())
    miss = report["final_proportion"] - 0.2
    assert report["target_reached"] is False and miss > report["target_tolerance"]
    assert f"{miss:.4f} above --target 0.2 (tolerance 0.02)" in error[0] and "--block-size (now 16)" in error[0]
    assert (out / "pruned" / "graph.json").exists()


def test_a_met_flops_target_is_recorded(tmp_path, monkeypatch):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    assert prune(out, "--baseline-steps", "0", "--finetune-steps", "0") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target_reached"] is True and report["final_proportion"] <= 0.5 + report["target_tolerance"]


# ------------------------------------------------------------------------------- image folders
def write_image_folder(root, corrupt_per_class: int, intact_per_class: int = 4):
    """Two classes of 8x8 PNGs, the first ``corrupt_per_class`` of each class broken: random bytes
    named .jpg, and a truncated PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    broken = []
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for index in range(intact_per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
        for index in range(corrupt_per_class):
            if index % 2:
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / "whole.png")
                path = root / name / f"truncated{index}.png"
                path.write_bytes((root / name / "whole.png").read_bytes()[:60])
                (root / name / "whole.png").unlink()
            else:
                path = root / name / f"random{index}.jpg"
                path.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
            broken.append(path)
    return broken


def test_corrupt_images_are_skipped_with_a_warning_that_counts_and_names_them(tmp_path, caplog):
    broken = write_image_folder(tmp_path, corrupt_per_class=2, intact_per_class=5)
    with caplog.at_level(logging.WARNING, logger="dagprune.data"):
        split = load_dataset(tmp_path, image_size=8)
    assert len(split.train) + len(split.val) == 10
    assert "skipped 4 of the 14 images" in caplog.text
    assert "cat/random0.jpg (not an image file PIL can identify)" in caplog.text
    assert "cat/truncated1.png (OSError" in caplog.text and "and 1 more" in caplog.text
    served = {split.val.dataset.reader.samples[i][0] for i in range(len(split.val.dataset.reader.samples))}
    assert not served & {str(path) for path in broken}


def test_an_image_folder_of_only_corrupt_images_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, corrupt_per_class=2, intact_per_class=0)
    with pytest.raises(DataError, match="none of the 4 images"):
        load_dataset(data, image_size=8)
    assert prune(tmp_path / "run", "--data-dir", str(data)) == 2
    error = capsys.readouterr().err.strip()
    assert "none of the 4 images" in error and str(data) in error and len(error.splitlines()) == 1


# ------------------------------------------------------------------------------- the environment
@pytest.mark.parametrize("raised, code, message", [
    (KeyboardInterrupt(), 130, "dagprune prune: interrupted; rerun the same command to resume"),
    (OSError(28, "No space left on device"), 2, "dagprune prune: error: OSError: [Errno 28] No space left"),
    (MemoryError(), 2, "dagprune prune: error: out of memory (MemoryError); lower the batch size"),
])
def test_interruptions_and_environment_errors_are_one_line(tmp_path, capsys, monkeypatch, raised, code, message):
    from dagprune_algorithms.app import prune_job

    def fail(args):
        raise raised

    monkeypatch.setattr(prune_job, "run_prune", fail)
    assert prune(tmp_path / "run") == code
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and len(error.splitlines()) == 1
