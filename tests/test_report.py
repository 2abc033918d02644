"""See it: explore, the study report, retrain, and optuna-dashboard in a real headless Chromium."""

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
from conftest import TRAINED_STUDY, browser_paths, hpo_main, stop

from hpo.engine.checkpoints import load_checkpoint
from hpo.engine.sources import synthetic


def test_explore_reports_the_recipe_s_numbers(tmp_path):
    r = hpo_main("explore", "--data", "synthetic", "--param", "data.train_size=600", "--param", "data.val_size=200",
                 "--param", "data.subset_size=300", "--out", tmp_path / "ex", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.splitlines()[-1])
    data = synthetic()
    assert stats["num_classes"] == 10 and stats["input_shape"] == [3, 32, 32]
    assert stats["dtype"] == "uint8" and stats["class_counts"]["all training images"] == [100] * 10
    assert stats["split_sizes"] == {"all training images": 1000, "train split": 600, "val split": 200, "test": 200}
    assert all(stats["balanced"].values())
    from hpo.config.schema import DataConfig
    from hpo.engine.data import make_splits

    train = data.train_x[make_splits(data.train_y, DataConfig(train_size=600, val_size=200, subset_size=300)).train]
    expected = (train / 255).mean(axis=(0, 1, 2))
    assert np.allclose(stats["pixel_stats_train_split"]["mean"], expected, atol=1e-4)
    assert np.allclose(stats["pixel_stats_train_split"]["std"], (train / 255).std(axis=(0, 1, 2)), atol=1e-4)
    page = (tmp_path / "ex" / "explore.html").read_text()
    assert "Sample images" in page and "Class histogram" in page and "class3" in page
    assert "Plotly.newPlot" in page and 'src="https://cdn.plot.ly' not in page  # plotly.js is inlined
    assert json.loads((tmp_path / "ex" / "explore.json").read_text()) == stats



def test_explore_takes_grayscale_images_and_float_features(tmp_path):
    from hpo.config.schema import DataConfig
    from hpo.engine.data import from_arrays
    from hpo.recipe.explore import explore, explore_lines

    rng = np.random.default_rng(0)
    cfg = DataConfig(train_size=0.6, val_size=0.2, subset_size=0.3)
    y = np.arange(60) % 3
    gray = from_arrays({"x_train": rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), "y_train": y}, "gray.npz")
    stats = explore(gray, cfg, tmp_path / "gray")
    assert stats["input_shape"] == [1, 8, 8] and len(stats["pixel_stats_train_split"]["mean"]) == 1
    assert "images 1 channels 8x8 uint8" in explore_lines(stats)[0]
    assert "Sample images" in (tmp_path / "gray" / "explore.html").read_text()

    features = from_arrays({"x_train": rng.normal(2.0, 1.0, (60, 5)).astype(np.float32), "y_train": y}, "f.npz")
    stats = explore(features, cfg, tmp_path / "features")
    assert stats["input_shape"] == [5] and abs(stats["pixel_stats_train_split"]["mean"][0] - 2.0) < 0.5
    assert "features 5 float32" in explore_lines(stats)[0]
    assert "Sample images" not in (tmp_path / "features" / "explore.html").read_text()

def test_the_study_report_has_every_figure(finished_study, tmp_path):
    tmp, path, url = finished_study
    out = tmp_path / "report.html"
    r = hpo_main("report", path, "--storage", url, "--out", out)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    for title in ("Optimization history", "val accuracy per epoch", "train loss per epoch",
                  "train.lr against train.batch_size", "Parameter importances", "Sanity gate", "Trials per worker"):
        assert title in page, title
    assert "not drawn" not in page
    assert "input_independent_baseline" in page  # the gate's checks, as recorded in the study
    assert page.count("Plotly.newPlot") == 6


def test_retrain_without_a_completed_trial_is_one_line(study_file, tmp_path):
    from hpo.config.study_file import load_study
    from hpo.study.identity import open_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(load_study(study_file(TRAINED_STUDY)), url, create=True)  # an hpo study with no trial yet
    r = hpo_main("retrain", "--study", "small", "--storage", url, "--device", "cpu", "--out", tmp_path / "r")
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("hpo: study 'small' has no completed trial to retrain yet; finish some with `hpo run` "
                        "first\n")
    assert not (tmp_path / "r").exists()


def test_retrain_trains_the_best_on_the_full_split_and_tests_once(finished_study, tmp_path):
    tmp, path, url = finished_study
    r = hpo_main("retrain", path, "--storage", url, "--device", "cpu", "--epochs", "2", "--out", tmp_path / "runs",
                 "--artifacts", tmp / "art", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert {"val_acc", "test_acc", "epochs_run", "checkpoint"} <= set(result) and result["epochs_run"] == 2
    study = optuna.load_study(study_name="small", storage=url)
    best = study.best_trial
    assert result["from_trial"] == best.number and result["params"] == best.params
    final = load_checkpoint(result["checkpoint"])
    assert final["config"]["data"]["train_on"] == "full" and final["test_acc"] == result["test_acc"]
    assert final["config"]["train"]["lr"] == best.params["train.lr"]
    # The recipe's final budget ([retrain]'s defaults), not the trial's: patience 10, StepLR(20, 0.1)
    assert {k: final["config"]["train"][k] for k in ("epochs", "patience", "step_size", "gamma")} == \
        {"epochs": 2, "patience": 10, "step_size": 20, "gamma": 0.1}
    assert 0.1 < result["test_acc"] <= 1.0
    assert list((tmp / "art").rglob(result["artifact"]))  # stored as a study artifact
    assert study.user_attrs["hpo:retrain"]["test_acc"] == result["test_acc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_dashboard_lists_the_study_and_its_trials_in_a_real_browser(finished_study):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp, path, url = finished_study
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hpo.cli", "dashboard", "--storage", url, "--port", str(port),
                               "--artifacts", str(tmp / "art")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.binary_location, chromedriver = browser_paths()
    browser = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        browser = webdriver.Chrome(service=Service(chromedriver), options=options)
        page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
        browser.get(f"http://127.0.0.1:{port}/dashboard")
        WebDriverWait(browser, 30).until(lambda _: "small" in page())
        assert "MAXIMIZE" in page()
        browser.get(f"http://127.0.0.1:{port}/dashboard/studies/1/trials")
        WebDriverWait(browser, 30).until(lambda _: "Trial 3" in page())
        text = page()
        assert "4 Trials" in text and all(f"Trial {i}" in text for i in range(4))
        WebDriverWait(browser, 30).until(lambda _: "best.pt" in page())  # the checkpoint artifact is listed
        study = optuna.load_study(study_name="small", storage=url)
        detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study._study_id}"))
        assert detail["objective_names"] == ["val_acc"]  # axes say val_acc, not "Objective 0"
        best = study.best_trial
        served = urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{best._trial_id}/"
                                        f"{best.user_attrs['checkpoint_artifact']}")
        assert served.headers["Content-Type"] == "application/octet-stream"  # a download, whatever its name
        assert load_checkpoint(io.BytesIO(served.read()))["epoch"] == best.user_attrs["best_epoch"]
    finally:
        if browser:
            browser.quit()
        stop(server)


def test_retrain_takes_its_budget_from_the_study_file_s_retrain_section(finished_study, tmp_path):
    """[retrain] replaces the trial's epochs, patience and StepLR, and any other [train] key and the
    augmentation it sets (it is not part of the study's identity, so the same study reads it); --param
    retrain.KEY goes over it."""
    tmp, path, url = finished_study
    edited = tmp_path / "small.toml"  # the same study name: the file's stem
    edited.write_text(Path(path).read_text() + "\n[retrain]\nepochs = 3\npatience = 1\nstep_size = 2\ngamma = 0.5\n"
                      "label_smoothing = 0.1\naugment = 'flip-shift'\n")
    r = hpo_main("retrain", edited, "--storage", url, "--device", "cpu", "--out", tmp_path / "runs", "--artifacts",
                 tmp / "art", "--param", "retrain.patience=0", "--param", "retrain.weight_decay=0.01", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    train = load_checkpoint(result["checkpoint"])["config"]["train"]
    assert (train["epochs"], train["patience"], train["step_size"], train["gamma"]) == (3, 0, 2, 0.5)
    assert (train["label_smoothing"], train["weight_decay"]) == (0.1, 0.01)
    assert load_checkpoint(result["checkpoint"])["config"]["augment"] == "flip-shift"  # the trial's was "none"
    assert result["epochs_run"] == 3
    history = json.loads((Path(result["checkpoint"]).parent / "results.json").read_text())["history"]
    assert [round(e["lr"] / history[0]["lr"], 6) for e in history] == [1.0, 1.0, 0.5]  # StepLR(2, 0.5)


def test_retrain_top_k_picks_by_full_val_and_the_report_shows_the_subset_to_full_table(finished_study, tmp_path):
    """--top 2: the two best trials retrained, the better on the full split's val is final (test is
    looked at once), and the report sets subset against full val acc with Spearman's rho."""
    tmp, path, url = finished_study
    r = hpo_main("retrain", path, "--storage", url, "--device", "cpu", "--epochs", "2", "--top", "2",
                 "--out", tmp_path / "runs", "--artifacts", tmp / "art", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    study = optuna.load_study(study_name="small", storage=url)
    two = sorted((t for t in study.trials if t.value is not None), key=lambda t: -t.value)[:2]
    assert [t["trial"] for t in result["transfer"]] == [t.number for t in two]
    assert [t["subset_val_acc"] for t in result["transfer"]] == [t.value for t in two]
    assert result["val_acc"] == max(t["full_val_acc"] for t in result["transfer"])
    assert result["from_trial"] == max(result["transfer"], key=lambda t: t["full_val_acc"])["trial"]
    assert result["spearman"] in (-1.0, 1.0, None)  # two trials: the same order, the other, or a tie
    assert "of 2 retrained" in r.stdout
    out = tmp_path / "report.html"
    assert hpo_main("report", path, "--storage", url, "--out", out).returncode == 0
    page = out.read_text()
    assert "Subset to full split: did the ranking hold?" in page and "Spearman&#x27;s rho" not in page
    assert "full_val_acc" in page and f"Final model: trial {result['from_trial']}" in page
    assert f"<td>{two[0].number}</td><td>lr={two[0].params['train.lr']:g}" in page  # each trial's params beside it
