"""`detectord train` on a slice of the lab data writes every artifact with its model card, picks a
default, and `detectord evaluate` reproduces the card's numbers; engineers' labels feed training;
`detectord tune` resumes its study."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detectord.offline.dataset import DatasetError
from detectord.offline.evaluation import Evaluation
from detectord.offline.training import Hyperparameters, pick_default, read_hyperparameters
from tests.support import REPO, small_data

pytestmark = [pytest.mark.slow]


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "detectord", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data(tmp_path_factory.mktemp("data"), normal_minutes=25, fault_minutes=14)


def _card_rows(card: str) -> dict[str, str]:
    """The side-by-side rows of a model card's comparison section, by detector."""
    section = card.split("## Beside the comparisons and the other models", 1)[1]
    return {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| ([^|]+?) \|.*$", section, re.MULTILINE)
        if m.group(1) not in ("detector", "---")
    }


def test_train_then_evaluate_reproduces_the_model_cards(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    proc = _run(
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--window",
        "16",
        "--heldout",
        "cpu_starvation",
        "--compare",
        "robust_z,isolation_forest",
        "--tensorboard",
        str(tmp_path / "tb"),
        "--steps",
        "5s",
    )
    assert "epoch 3/3" in proc.stdout and "default:" in proc.stdout  # progress, and the choice
    assert any((tmp_path / "tb" / "conv_autoencoder").rglob("*tfevents*"))
    step = out / "5s"
    for path in [step / k for k in ("conv_autoencoder", "conv_classifier", "siamese")] + [out / "default" / "5s"]:
        meta = json.loads((path / "detectord-model.json").read_text())
        assert meta["training_data"]["heldout_classes"] == ["cpu_starvation"]
        assert meta["calibration"]["target_false_alerts_per_instance_day"] == 0.5
        card = (path / "MODEL_CARD.md").read_text()
        assert "held-out" in card and "robust_z" in card and "isolation_forest" in card
    assert (step / "report" / "report.md").exists() and (step / "report" / "precision_recall.png").exists()
    report = json.loads((step / "report" / "evaluation.json").read_text())
    assert {"conv_autoencoder", "conv_classifier", "siamese", "robust_z", "isolation_forest"} <= set(report)
    # The model set: one model per step, and its card.
    assert "| 5s |" in (out / "default" / "MODEL_CARD.md").read_text()

    card = (step / "conv_classifier" / "MODEL_CARD.md").read_text()
    ev = _run(
        "evaluate",
        str(step / "conv_classifier"),
        str(data_dir),
        "--out",
        str(tmp_path / "eval"),
        "--compare",
        "robust_z,isolation_forest",
    )
    printed = {m.group(1): m.group(0) for m in re.finditer(r"^\| ([^|]+?) \|.*$", ev.stdout, re.MULTILINE)}
    rows = _card_rows(card)
    for name in ("conv_classifier", "robust_z", "isolation_forest"):
        assert printed[name] == rows[name], name


def test_labels_feed_the_supervised_models(data_dir: Path, tmp_path: Path) -> None:
    """An engineer marks a stretch of a healthy edge as an incident of a new class: the classifier
    learns the class and the data description counts it."""
    from detectord.offline.dataset import load_datasets

    base = load_datasets([data_dir], window=16, step_s=5.0, heldout=())
    # A healthy edge in a training block (the split is by blocks; labels elsewhere validate or test).
    info = next(
        i
        for i in base.series
        if i.recording == "normal" and i.instance[0] == "coredns-edge" and all(r == "train" for r in i.role[150:211])
    )
    t = info.timestamps_ms
    labels = tmp_path / "labels.yaml"
    labels.write_text(
        f"- dataset: normal\n  labels: {{job: coredns-edge, instance: {info.instance[1]}}}\n"
        f"  start: {int(t[150])}\n  end: {int(t[210])}\n  verdict: anomaly\n  class: engineer_says\n"
    )
    out = tmp_path / "models"
    _run(
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--window",
        "16",
        "--kinds",
        "conv_classifier",
        "--labels",
        str(labels),
        "--heldout",
        "",
        "--compare",
        "",
        "--tensorboard",
        "",
        "--steps",
        "5s",
    )
    meta = json.loads((out / "5s" / "conv_classifier" / "detectord-model.json").read_text())
    assert "engineer_says" in meta["classes"]
    assert meta["training_data"]["settings"]["labels"] == str(labels)


def test_tune_resumes_its_study(data_dir: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    args = [
        "tune",
        "--kind",
        "conv_autoencoder",
        "--data",
        str(data_dir),
        "--epochs",
        "1",
        "--storage",
        storage,
        "--out",
        str(tmp_path),
    ]
    first = _run(*args, "--trials", "2")
    assert "0 trials done, 2 to go" in first.stdout
    second = _run(*args, "--trials", "3")
    assert "2 trials done, 1 to go" in second.stdout
    tried = [
        line.split(":", 1)[1].split(";")[0]
        for line in (first.stdout + second.stdout).splitlines()
        if line.startswith("trial ")
    ]
    assert len(tried) == 3 and tried[2] not in tried[:2], tried  # resuming explores, it does not repeat
    best = json.loads((tmp_path / "best-conv_autoencoder.json").read_text())
    assert best["trials"] == 3 and best["window"] in (16, 32, 64) and "filters" in best["config"]["conv_autoencoder"]
    # What tune writes is what `train --config` takes: the settings, learning rate and window.
    hp = read_hyperparameters(tmp_path / "best-conv_autoencoder.json")
    assert hp == Hyperparameters(best["config"], best["learning_rate"], best["window"])


def test_a_config_of_unknown_kinds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"conv_autoencodr": {"latent": 4}}))
    with pytest.raises(DatasetError, match="conv_autoencodr"):
        read_hyperparameters(path)


def _judged(name: str, caught: int, events: int, false_alerts: int = 0) -> Evaluation:
    p = caught / (caught + false_alerts) if caught + false_alerts else 0.0
    r = caught / events
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return Evaluation(name, {}, {"events": events, "caught": caught, "f1": f1}, {}, {}, {}, {})


def test_one_validation_incident_does_not_pick_the_default() -> None:
    """Seven validation incidents: catching one more is noise, not a better model; the classifier
    (whose alerts name the incident class) is taken among equals, and a clear lead still wins."""
    near = {
        "conv_autoencoder": _judged("a", 6, 7),
        "conv_classifier": _judged("c", 6, 7),
        "siamese": _judged("s", 7, 7),
    }
    assert pick_default(near) == "conv_classifier"
    clear = {**near, "conv_classifier": _judged("c", 4, 7), "conv_autoencoder": _judged("a", 5, 7, false_alerts=1)}
    assert pick_default(clear) == "siamese"
