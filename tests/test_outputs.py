"""Nothing a user gives is lost: output paths checked before any work, one writer per run
directory, bundles replaced whole, left-out data counted (crnn/outputs.py and the tools)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from crnn.errors import CrnnError
from crnn.outputs import (
    LOCK_NAME,
    RunLock,
    atomic_write,
    check_output_dir,
    check_output_file,
    lock_file,
    replace_folder,
)
from tests.helpers import REPO, TINY, run_python, run_tool, synthetic_folder

TRAIN = ("tools/train.py", "--cfg", TINY)


def last_error(result: subprocess.CompletedProcess) -> str:
    """A failed tool's last stderr line, asserted to be an `error:` line with status 2, no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("a file where a folder is needed", encoding="utf-8")
    return path


def test_output_paths_are_checked_for_files_in_the_way(blocker, tmp_path):
    with pytest.raises(CrnnError, match=f"--out: {blocker / 'sub'}: {blocker} is a file, not a folder"):
        check_output_dir(blocker / "sub", "--out")
    with pytest.raises(CrnnError, match=f"train.output_dir: {blocker}: it is a file, not a folder"):
        check_output_dir(blocker, "train.output_dir")
    with pytest.raises(CrnnError, match=f"--json: {tmp_path} is a folder; give a file name"):
        check_output_file(tmp_path, "--json")
    assert check_output_file(tmp_path / "new" / "r.json", "--json") == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_predict_checks_out_before_loading_anything(blocker, tmp_path):
    page = tmp_path / "p.xml"
    page.write_text("<alto/>", encoding="utf-8")
    # the checkpoint does not exist: the --out error comes first, so it was checked before loading
    line = last_error(run_tool("tools/predict.py", "--ckpt", tmp_path / "missing.pt", page, "--out", blocker / "sub"))
    assert line == f"error: --out: {blocker / 'sub'}: {blocker} is a file, not a folder; give a folder"


def test_train_checks_its_output_dir_before_reading_data(blocker, tmp_path):
    # the data folder does not exist either: the output_dir error comes first
    line = last_error(run_tool(*TRAIN, f"train.output_dir={blocker}", "data.source=folder",
                               f"data.train={tmp_path / 'nowhere'}"))
    assert line == f"error: train.output_dir: {blocker}: it is a file, not a folder; give a folder"
    assert blocker.read_text(encoding="utf-8") == "a file where a folder is needed"


def hold_lock(folder):
    """Another process holding `folder`'s run lock until killed; returns it once the lock is held."""
    code = ("import sys, time; from crnn.outputs import RunLock; lock = RunLock(sys.argv[1], 'x').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_live_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        line = last_error(run_tool(*TRAIN, f"train.output_dir={run_dir}"))
        assert f"train.output_dir: {run_dir} is in use by another run (process {holder.pid} on " in line
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the file stays, the OS lock goes
    holder.wait()
    assert (run_dir / LOCK_NAME).is_file()
    result = run_tool(*TRAIN, f"train.output_dir={run_dir}", "train.epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"took over the lock of {run_dir} left by process {holder.pid}, which is no longer running" in result.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / LOCK_NAME).exists()


def test_the_lock_is_released_on_any_exit_and_a_failed_start_leaves_no_folder(tmp_path):
    lock = RunLock(tmp_path / "run", "train.output_dir").acquire()
    with pytest.raises(CrnnError, match="is in use by another run"):
        RunLock(tmp_path / "run", "train.output_dir").acquire()  # a second open file: refused too
    lock.release()
    assert not (tmp_path / "run").exists()  # it created the folder and nothing was written in it
    with RunLock(tmp_path / "run", "train.output_dir") as again:
        assert again.taken_over is None
        (tmp_path / "run" / "kept.txt").write_text("x", encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["kept.txt"]


@pytest.mark.slow
def test_under_torchrun_rank_0_takes_the_lock_and_a_held_one_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        started = time.monotonic()
        result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *TRAIN,
                          f"train.output_dir={run_dir}", env={"OMP_NUM_THREADS": "1"}, timeout=240)
        assert result.returncode != 0 and time.monotonic() - started < 200
        assert f"{run_dir} is in use by another run (process {holder.pid}" in result.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_resume_auto_with_nothing_to_resume_says_so(tmp_path):
    result = run_tool(*TRAIN, f"train.output_dir={tmp_path / 'run'}", "train.resume=auto", "train.epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"train.resume=auto: nothing to resume in {tmp_path / 'run'} (no checkpoints/last.pt), so a new run "
            f"starts") in result.stderr


def test_export_never_mixes_bundles_or_writes_into_other_files(checkpoint, tmp_path):
    bundle = tmp_path / "bundle"
    assert run_tool("tools/export.py", "--ckpt", checkpoint, "--out", bundle).returncode == 0
    first = snapshot(bundle)
    again = last_error(run_tool("tools/export.py", "--ckpt", checkpoint, "--out", bundle))
    assert again == f"error: --out {bundle}: already holds a bundle; add --force to replace it"
    (bundle / "notes.txt").write_text("mine", encoding="utf-8")
    mixed = last_error(run_tool("tools/export.py", "--ckpt", checkpoint, "--out", bundle, "--force"))
    assert "holds files that are not part of its bundle (notes.txt)" in mixed
    assert snapshot(bundle) == {**first, "notes.txt": b"mine"}
    (bundle / "notes.txt").unlink()
    assert run_tool("tools/export.py", "--ckpt", checkpoint, "--out", bundle, "--force").returncode == 0
    assert sorted(snapshot(bundle)) == sorted(first)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # nothing left beside it
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("mine", encoding="utf-8")
    refused = last_error(run_tool("tools/export.py", "--ckpt", checkpoint, "--out", other, "--force"))
    assert refused == f"error: --out {other}: a folder that holds other files and no bundle; give a new or empty folder"
    assert snapshot(other) == {"config.yaml": b"mine"}


def test_replace_folder_leaves_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "bundle"
    replace_folder(out, lambda folder: (folder / "a").write_text("old", encoding="utf-8"))

    def fail(folder):
        (folder / "a").write_text("new", encoding="utf-8")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_folder(out, fail)
    assert snapshot(out) == {"a": b"old"} and [p.name for p in tmp_path.iterdir()] == ["bundle"]
    # of two writers of a folder that must not change under its readers (a page's crops), the first stays
    replace_folder(out, lambda folder: (folder / "a").write_text("second", encoding="utf-8"), keep_existing=True)
    assert snapshot(out) == {"a": b"old"} and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_failed_atomic_write_leaves_the_old_file_and_nothing_beside_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write(path, lambda stream: stream.write(b"old\n"))

    def fail(stream):
        stream.write(b"half a li")
        raise ValueError("the data ran out")  # any error, not only an OSError

    with pytest.raises(ValueError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.slow
def test_lock_file_waits_or_refuses_while_another_process_holds_it(tmp_path):
    path = tmp_path / "index.lock"
    code = ("import sys, time; from crnn.outputs import lock_file; held = lock_file(sys.argv[1]); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), "1.5"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_file(path, wait=False) is None
        started = time.monotonic()
        with lock_file(path):  # waits for the holder to exit: the OS releases its lock
            assert time.monotonic() - started > 0.5
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_that_is_not_a_bundle_is_named_as_such(tmp_path):
    (tmp_path / "model").mkdir()
    synthetic_folder(tmp_path / "lines", 1)
    line = last_error(run_tool("tools/predict.py", "--ckpt", tmp_path / "model", tmp_path / "lines"))
    assert line.startswith(f"error: {tmp_path / 'model'}: this folder holds no export bundle (no bundle.json)")


def bad_entries(folder):
    """Six entries of a folder split that cannot be used, of four kinds, beside the good ones."""
    (folder / "1.png").write_bytes(b"")
    (folder / "2.png").write_bytes(b"\x89PNG broken")
    (folder / "3.png").write_bytes(b"")
    rows = (folder / "gt.tsv").read_text(encoding="utf-8").splitlines()
    rows += ["ghost.png\tboo", "ghost2.png\tbah", "3.png\t", "no tab here"]
    (folder / "gt.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_evaluate_counts_the_left_out_entries_by_reason(checkpoint, tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 3)
    bad_entries(lines)
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "validation", "data.source=folder",
                      f"data.validation={lines}", "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["greedy"]["lines"] == 1
    assert (f"5 line(s) of {lines} left out (2 image file not found, 1 empty transcription, 1 gt.tsv line without "
            f"a TAB, 1 empty image file); first:") in result.stderr
    assert ("2 unreadable line(s) left out (1 empty image file, 1 unreadable image); first:") in result.stderr
    assert result.stderr.count("tools/check_data.py lists them all") == 2


def test_check_data_names_empty_and_unreadable_images(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 3)
    bad_entries(lines)
    result = run_tool("tools/check_data.py", "--cfg", TINY, "--splits", "train", "data.source=folder",
                      f"data.train={lines}")
    assert result.returncode == 1
    gt = lines / "gt.tsv"
    for expected in (f"{lines / '1.png'}: empty file (0 bytes), not an image",
                     f"{lines / '2.png'}: unreadable image",
                     f"{gt} line 6: empty transcription",
                     f"{lines / '3.png'}: empty file (0 bytes), not an image (named by {gt} line 6, which was skipped)"):
        assert expected in result.stdout, (expected, result.stdout)
    assert "3.png: image has no entry in gt.tsv" not in result.stdout
