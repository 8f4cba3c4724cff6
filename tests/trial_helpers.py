"""Fake trial dirs that follow the train/evaluate file contract, for the selection and report
tests: ``make_trial`` writes ``<root>/<name>/{model,eval}`` as train and evaluate would."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lungxray import site_metrics
from lungxray.metrics import compute_metrics

CLASSES = ["normal", "pneumonia"]
Y = np.array([0, 0, 0, 1, 1, 1])
# P(pneumonia) per sample. GOOD ranks all positives first (AUC 1); MID mis-ranks one pair
# (AUC 8/9); POOR mis-ranks three pairs (AUC 6/9).
GOOD = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
MID = [0.1, 0.2, 0.75, 0.7, 0.8, 0.9]
POOR = [0.1, 0.85, 0.75, 0.7, 0.8, 0.9]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


_METRICS: dict[tuple, dict] = {}


def _metrics(y: np.ndarray, probs: np.ndarray, classes: list[str],
             threshold: float | None) -> dict:
    """compute_metrics, once per distinct input: it is deterministic (seeded bootstrap), and its
    1000 resamples made building the fake trials most of this module's run time."""
    key = (y.tobytes(), probs.tobytes(), probs.shape, tuple(classes), threshold)
    if key not in _METRICS:
        _METRICS[key] = compute_metrics(y, probs, classes, threshold)
    return _METRICS[key]


def make_trial(
    root: Path,
    name: str,
    scores: dict[str, list[float]],
    *,
    lr: float = 1e-3,
    classes: list[str] = CLASSES,
    labels: dict[str, np.ndarray] | None = None,
    info_extra: dict | None = None,
) -> Path:
    """Write ``root/name/{model,eval}`` exactly as train and evaluate do."""
    trial = root / name
    model = trial / "model"
    model.mkdir(parents=True)
    binary = len(classes) == 2
    info = {
        "model_name": name, "class_names": classes, "positive_class": 1 if binary else None,
        "threshold": 0.5 if binary else None, "threshold_method": "youden" if binary else None,
        "image_size": 32, "input_size": 32, "channels": 1, "weights": "none",
        "hparams": {"learning_rate": lr, "dropout": 0.3, "dense": {"units": 64}},
        "params": 1000 + len(name), "train_seconds": 12.5, "epochs": 3, **(info_extra or {}),
    }
    (model / "model_info.json").write_text(json.dumps(info))
    (model / "model.keras").write_bytes(f"fake keras model {name}".encode())
    history = {k: [0.5, 0.6, 0.7] for k in
               ("loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc")}
    phases = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 1}]
    (model / "history.json").write_text(json.dumps({"history": history, "phases": phases}))
    (model / "curves.png").write_bytes(PNG)
    for split, s in scores.items():
        y = labels[split] if labels and split in labels else Y
        probs = np.asarray(s, dtype=float)
        if probs.ndim == 1:
            probs = np.column_stack([1 - probs, probs])
        d = trial / "eval" / split
        d.mkdir(parents=True)
        m = _metrics(y, probs, classes, info["threshold"])
        (d / "metrics.json").write_text(json.dumps({**m, "split": split, "model_name": name}))
        pred = pd.DataFrame({"y_true": y, **{f"prob_{c}": probs[:, i]
                                             for i, c in enumerate(classes)}})
        pred.to_csv(d / "predictions.csv", index=False)
        for plot in ("confusion_matrix", "roc", "pr", "reliability"):
            (d / f"{plot}.png").write_bytes(PNG)
    return trial


def three_trials(tmp_path: Path) -> list[Path]:
    """Validation picks VGG16; test alone would pick ResNet152V2."""
    root = tmp_path / "trials"
    return [
        make_trial(root, "ResNet152V2", {"val": MID, "test": GOOD}, lr=1e-4),
        make_trial(root, "VGG16", {"val": GOOD, "test": POOR}, lr=1e-3),
        make_trial(root, "InceptionV3", {"val": POOR, "test": MID}, lr=3e-4),
    ]


# A and B each mis-rank one (negative, positive) pair on validation (AUC 8/9); their mean ranks
# every positive above every negative (AUC 1), so the ensemble wins on validation.
ENS_A = [0.1, 0.2, 0.65, 0.6, 0.8, 0.9]
ENS_B = [0.1, 0.55, 0.2, 0.5, 0.7, 0.9]


def add_robustness(trial: Path, split: str, corrupted: list[float]) -> None:
    """What evaluate writes for the corruption suite: the clean rows are the split's own
    predictions, every corruption x severity gives ``corrupted`` (and invert reverses them)."""
    from lungxray import robustness

    d = trial / "eval" / split
    preds = pd.read_csv(d / "predictions.csv")
    clean = preds["prob_pneumonia"].to_numpy()
    frames = []
    for name, severity in [("clean", 0)] + [(c, s) for c in ("blur", "invert") for s in (1, 2, 3)]:
        p = clean if name == "clean" else 1 - clean if name == "invert" else np.asarray(corrupted)
        frames.append(pd.DataFrame({"row": range(len(p)), "y_true": preds["y_true"],
                                    "corruption": name, "severity": severity,
                                    "prob_normal": 1 - p, "prob_pneumonia": p}))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(d / "robustness_predictions.csv", index=False)
    summary = robustness.summarize(table, CLASSES)
    metrics = json.loads((d / "metrics.json").read_text())
    metrics.update({"robustness": summary, "robust_auc": summary["mean_corrupted_auc"],
                    "worst_corrupted_auc": summary["worst_corrupted_auc"],
                    "robust_auc_drop": summary["drop"]})
    (d / "metrics.json").write_text(json.dumps(metrics))


# Two sites of five images each on validation; SITE_X ranks the pooled rows well but puts site
# a's only positive below all its negatives, SITE_Y ranks each site perfectly but mixes the sites.
SITE_LABELS = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
SITE_OF_ROW = np.array(["a"] * 5 + ["b"] * 5, dtype=object)
SITE_X = [0.30, 0.32, 0.34, 0.36, 0.29, 0.05, 0.90, 0.91, 0.92, 0.93]  # pooled 0.84, worst 0
SITE_Y = [0.80, 0.81, 0.82, 0.83, 0.84, 0.10, 0.20, 0.30, 0.40, 0.50]  # pooled 0.36, worst 1


def site_trial(root: Path, name: str, val: list[float], held: bool = True) -> Path:
    """A fake trial (:func:`make_trial`) whose val and test splits hold sites a and b, written
    as evaluate writes a split of several sites; ``held``: also a held-out site c."""
    splits = ["val", "test", *(["test_site_c"] if held else [])]
    trial = make_trial(root, name, {s: val for s in splits},
                       labels={s: SITE_LABELS for s in splits})
    for split in ("val", "test"):
        d = trial / "eval" / split
        metrics = json.loads((d / "metrics.json").read_text())
        probs = np.column_stack([1 - np.asarray(val), np.asarray(val)])
        site_metrics.add_per_site(metrics, SITE_LABELS, probs, SITE_OF_ROW, CLASSES,
                                  metrics["threshold"])
        (d / "metrics.json").write_text(json.dumps(metrics))
        preds = pd.read_csv(d / "predictions.csv")
        preds["site"] = SITE_OF_ROW
        preds.to_csv(d / "predictions.csv", index=False)
    return trial
