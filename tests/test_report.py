"""Report figures and tables (dinosae.report), `dinosae status` on a folder with nothing in it,
and progress lines in job logs (dinosae.progress.Progress)."""

import io
import logging
import re
import sys

import h5py
import numpy as np
from helpers import html_table
from PIL import Image

from dinosae import cli
from dinosae import progress as progress_module
from dinosae.progress import Progress
from dinosae.report import last_grid, metrics_table, plot_metrics, sample_grids


def test_plot_metrics_draws_each_finite_curve_but_not_bookkeeping(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,lr,loss,g_gan,skipped,sec_per_step\n"
                   "2,0.1,1.5,nan,0,0.3\n4,0.1,1.2,nan,0,0.3\n6,0.05,0.9,,0,0.3\n")
    names = plot_metrics(csv, tmp_path / "loss.png", "stage x")
    assert names == ["lr", "loss"]  # g_gan never finite; step/skipped/timing are bookkeeping
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_plot_metrics_draws_the_gfid_proxy_of_its_evaluation_steps(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,gpu_mem_gb,FD_teacher_proxy,proxy_sec\n2,1.5,nan,nan,nan\n"
                   "4,1.2,nan,30.5,2.0\n6,0.9,nan,nan,nan\n8,0.8,nan,21.25,2.1\n")
    assert plot_metrics(csv, tmp_path / "loss.png", "dit") == ["loss", "FD_teacher_proxy"]


def test_last_grid_is_the_highest_step(tmp_path):
    for step in (4, 100, 12):
        (tmp_path / f"grid_{step:06d}.png").write_bytes(b"")
    (tmp_path / "recon.png").write_bytes(b"")
    assert last_grid(tmp_path).name == "grid_000100.png"


def test_sample_grids_one_per_class_with_only_that_class(tmp_path):
    # class c's images are the colour (200, 40·c + 10, 0), which no grey title text can be:
    # each grid must show its own class's colour and no other
    labels = np.array([0, 1, 2, 0, 1, 0])
    images = np.zeros((6, 8, 8, 3), np.uint8)
    images[..., 0], images[..., 1] = 200, (labels * 40 + 10)[:, None, None]
    with h5py.File(tmp_path / "samples.h5", "w") as f:
        f["images"], f["labels"] = images, labels
        f.attrs["classes"] = ["cat", "dog", "owl"]
    outs = [str(tmp_path / f"class_{j}.png") for j in range(4)]  # one more than the run has
    sample_grids({}, str(tmp_path / "samples.h5"), outs)
    for c in range(3):
        pixels = np.asarray(Image.open(outs[c]).convert("RGB")).reshape(-1, 3)
        image_pixels = pixels[(pixels[:, 0] == 200) & (pixels[:, 2] == 0)]
        assert {int(g) for g in np.unique(image_pixels[:, 1])} == {40 * c + 10}
    assert Image.open(outs[3]).width > 0  # an empty grid for a class the run lacks


def test_metrics_table_holds_every_key_and_value(tmp_path):
    kv = {"metric": "FD_teacher", "FD_teacher": "81.2", "IS": "n/a <inception>"}
    (tmp_path / "gfid.txt").write_text("".join(f"{k}: {v}\n" for k, v in kv.items()))
    metrics_table({}, str(tmp_path / "gfid.txt"), "Generation", str(tmp_path / "gfid.html"))
    assert html_table((tmp_path / "gfid.html").read_text()) == kv


def test_status_needs_no_config_and_reports_missing_stages(tmp_path, capsys):
    assert cli.main(["status", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = {ln.split("  ")[0].strip(): ln for ln in lines[2:]}
    assert set(stages) == {"ae stage1", "ae stage2", "ae stage3", "ae stage4", "recon",
                           "latents", "dit", "samples", "gfid"}
    assert all(" missing " in ln for ln in stages.values())


def test_status_names_imported_weights_and_stopped_jobs(tmp_path, capsys):
    import torch

    (tmp_path / "ae/stage4").mkdir(parents=True)
    torch.save({"kind": "dinosae-ae", "stage": 4, "step": 0,
                "imported": {"source": "hf-hub:org/dinosae"}}, tmp_path / "ae/stage4/checkpoint.pt")
    (tmp_path / "dit").mkdir()  # a DiT stopped at step 3 of 6: only last.pt and its metrics
    torch.save({"kind": "dinosae-dit", "step": 3, "config": {"dit": {"steps": 6}},
                "ae": "results/ae/stage4/checkpoint.pt", "cache": "results/latents/train.zarr"},
               tmp_path / "dit/last.pt")
    (tmp_path / "dit/metrics.csv").write_text("step,loss\n2,2.5\n3,2.25\n")
    assert cli.main(["status", "--results", str(tmp_path)]) == 0
    rows = {ln.split("  ")[0]: ln for ln in capsys.readouterr().out.splitlines()[2:]}
    assert " done " in rows["ae stage4"]
    assert rows["ae stage4"].endswith("imported from hf-hub:org/dinosae")
    assert " partial " in rows["dit"] and "step 3/6, loss 2.25" in rows["dit"]
    assert rows["dit"].endswith("stage4/checkpoint.pt (cache results/latents/train.zarr)")


def test_progress_without_a_terminal_logs_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a Slurm log file, not a terminal
    clock = [1000.0]  # time.time() of the progress (and of logging) stands still until moved
    monkeypatch.setattr(progress_module.time, "time", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="dinosae")
    progress = Progress(10, desc="encode", unit="img", seconds=3.0)
    for _ in range(10):  # one image per second
        clock[0] += 1.0
        progress.update(1, loss=0.5)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "encode 1/10 img (1.00 img/s, ETA 0:00:09) loss=0.5"
    assert lines[-1].startswith("encode 10/10 img (1.00 img/s, ETA 0:00:00)")
    assert len(lines) == 4  # at 1, 4, 7 and 10 s: periodic, not one line per step
    assert all(re.search(r"\d+\.\d\d img/s, ETA \d+:\d\d:\d\d", ln) for ln in lines)


def test_progress_on_a_terminal_draws_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    progress = Progress(4, desc="sample", unit="img")
    progress.update(4)
    progress.close()
    out = sys.stderr.getvalue()
    assert "sample" in out and "100%" in out and "4/4" in out
