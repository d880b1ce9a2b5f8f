"""What the frozen text encoder lets a scenes model read from a held-out wording: linear probes of caption features.

Every digit of the scenes gets its own clause ("a big thick 8 on the right"), in the training wording and in the
held-out wording (other synonyms and place phrases, never seen in training; ``data.scenes``). Per attribute
(digit, position, size, thickness, slant) two classifiers are fitted on the features of the training scenes'
clauses in the training wording, then scored on the test scenes' clauses in both wordings: a logistic
regression, and the nearest class centroid by cosine (the geometry of the sentence space, nothing fitted
beyond the class means). Two
readouts of the encoder's token features: their mean over the real tokens (the sentence embedding
all-MiniLM-L6-v2 was trained to give) and the first token ([CLS]).

A denoiser reads the tokens through cross-attention, which is not a linear probe, so these rates are not a
bound on what a trained model can do; they say how far the encoder's geometry carries a phrase it was never
trained on towards the phrase it was: where a probe fitted on the training wording fails on the held-out
wording, the model has to find in the tokens what a linear readout of the sentence does not.

    OMP_NUM_THREADS=2 .venv/bin/python bench/text_probe.py [--n-train 4000] [--n-test 1000] [--json out.json]

Prints the result as JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cascade import emit, run_bench
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from diffusekit.data.scenes import ATTRIBUTES, Scene, SceneTable, caption, scene_table
from diffusekit.nn.embeddings import token_mean
from diffusekit.text import load_text_encoder

READOUTS = ("mean", "cls")
CLASSIFIERS = ("logistic", "centroid")


def clauses(table: SceneTable, wording: str, seed: int) -> tuple[list[str], dict[str, list]]:
    """One clause per digit of ``table``'s scenes in ``wording``, and each clause's attribute values (None where
    the digit has no stated thickness or slant)."""
    texts: list[str] = []
    labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
    thr = table.thresholds
    for i, scene in enumerate(table.scenes):
        for j, digit in enumerate(scene.digits):
            texts.append(caption(Scene((digit,)), thr, wording, np.random.default_rng([seed, i, j])))
            values = {"digit": digit.label, "position": digit.position, "size": digit.size,
                      "thickness": thr.thickness_word(digit.thickness), "slant": thr.slant_word(digit.slant)}
            for a in ATTRIBUTES:
                labels[a].append(values[a])
    return texts, labels


@torch.no_grad()
def readouts(encoder, texts: Sequence[str], batch: int = 256) -> dict[str, np.ndarray]:
    """The mean of the real tokens' features and the first token's, (N, D) each."""
    out: dict[str, list[np.ndarray]] = {r: [] for r in READOUTS}
    for i in range(0, len(texts), batch):
        f = encoder.encode(list(texts[i:i + batch]))
        out["mean"].append(token_mean(f.tokens, f.mask).numpy())
        out["cls"].append(f.tokens[:, 0].numpy())
    return {r: np.concatenate(v) for r, v in out.items()}


class NearestCentroid:
    """The class whose mean unit feature has the largest cosine with the clause's."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> NearestCentroid:
        self.classes = np.unique(y)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = np.stack([unit[y == k].mean(0) for k in self.classes])
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[(x @ self.centroids.T).argmax(1)]


def probe(x_fit: np.ndarray, y_fit: list, tests: dict[str, tuple[np.ndarray, list]]) -> dict[str, Any]:
    """Fit each classifier on the clauses with a value; its accuracy on each test set, and the rate of always
    answering the fitted set's most common value."""
    keep = [i for i, y in enumerate(y_fit) if y is not None]
    y = np.array([str(y_fit[i]) for i in keep])
    models = {"logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
              "centroid": NearestCentroid()}
    for model in models.values():
        model.fit(x_fit[keep], y)
    values, counts = np.unique(y, return_counts=True)
    majority = values[counts.argmax()]
    result: dict[str, Any] = {"classes": len(values), "fitted": len(keep)}
    for name, (x, labels) in tests.items():
        idx = [i for i, v in enumerate(labels) if v is not None]
        truth = np.array([str(labels[i]) for i in idx])
        for kind, model in models.items():
            result[f"{name}_{kind}"] = float((model.predict(x[idx]) == truth).mean())
        result[f"{name}_majority"] = float((truth == majority).mean())
        result[f"{name}_n"] = len(idx)
    return result


def run(n_train: int = 4000, n_test: int = 1000, seed: int = 0, encoder=None) -> dict[str, Any]:
    encoder = encoder if encoder is not None else load_text_encoder()
    fit_texts, fit_labels = clauses(scene_table("train", n_train, seed), "train", seed)
    test = scene_table("test", n_test, seed)
    sets = {w: clauses(test, w, seed + 1) for w in ("train", "heldout")}
    fit_x = readouts(encoder, fit_texts)
    test_x = {w: readouts(encoder, texts) for w, (texts, _) in sets.items()}
    result: dict[str, Any] = {"n_train_scenes": n_train, "n_test_scenes": n_test, "seed": seed,
                              "examples": {"fit": fit_texts[:3], **{w: sets[w][0][:3] for w in sets}}}
    for r in READOUTS:
        result[r] = {a: probe(fit_x[r], fit_labels[a],
                              {f"{w}_wording": (test_x[w][r], sets[w][1][a]) for w in sets})
                     for a in ATTRIBUTES}
    return result


def markdown(result: dict[str, Any]) -> str:
    head = ["readout", "classifier", "wording", *ATTRIBUTES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in READOUTS:
        for kind in CLASSIFIERS:
            for w in ("train_wording", "heldout_wording"):
                cells = [f"{result[r][a][f'{w}_{kind}']:.3f}" for a in ATTRIBUTES]
                lines.append("| " + " | ".join([r, kind, w.split("_")[0], *cells]) + " |")
    lines.append("| always the commonest | | held-out | " + " | ".join(
        f"{result[READOUTS[0]][a]['heldout_wording_majority']:.3f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=4000, help="training scenes whose clauses fit the probes")
    p.add_argument("--n-test", type=int, default=1000, help="test scenes whose clauses score them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for flag, value in (("--n-train", args.n_train), ("--n-test", args.n_test)):
        if not 1 <= value <= 4000:
            p.error(f"{flag} must be between 1 and 4000, got {value}")
    result = run(args.n_train, args.n_test, args.seed)
    emit(result, args.json, markdown(result))
    return result


if __name__ == "__main__":
    run_bench(main, "text_probe.py")
