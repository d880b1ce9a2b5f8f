"""bench/text_probe.py: the clauses it probes, its classifiers and its rates, with the stand-in text encoder."""

import importlib
from pathlib import Path

import numpy as np
import pytest
from test_text_latent import FAKE

from diffusekit.data.scenes import ATTRIBUTES, Scene, caption, scene_table


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.setattr("diffusekit.text.load_text_encoder", lambda: FAKE)
    return importlib.import_module("text_probe")


def test_clauses_are_one_digit_captions_with_their_attributes(bench):
    table = scene_table("test", 12)
    texts, labels = bench.clauses(table, "heldout", seed=3)
    digits = [(i, j, d) for i, s in enumerate(table.scenes) for j, d in enumerate(s.digits)]
    assert len(texts) == len(digits) > 12  # some scenes hold two digits
    thr = table.thresholds
    for k, (i, j, d) in enumerate(digits):
        assert texts[k] == caption(Scene((d,)), thr, "heldout", np.random.default_rng([3, i, j]))
        assert (labels["digit"][k], labels["position"][k], labels["size"][k]) == (d.label, d.position, d.size)
        assert labels["thickness"][k] == thr.thickness_word(d.thickness)
        assert labels["slant"][k] == thr.slant_word(d.slant)
    assert set(labels) == set(ATTRIBUTES)


def test_nearest_centroid_by_cosine(bench):
    x = np.array([[1.0, 0.1], [2.0, -0.1], [0.0, 1.0], [0.1, 3.0]])
    y = np.array(["a", "a", "b", "b"])
    model = bench.NearestCentroid().fit(x, y)
    # the scale of a feature does not matter, only its direction
    assert list(model.predict(np.array([[5.0, 0.0], [0.0, 0.01], [1.0, 0.9], [0.9, 1.0]]))) == ["a", "b", "a", "b"]


def test_probe_rates_and_majority(bench):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = ["p" if v > 0 else "q" for v in x[:, 0]]
    y[0] = None  # a clause without a stated value is left out of both fitting and scoring
    test_y = ["p" if v > 0 else "q" for v in x[:, 0]]
    test_y[1] = None
    r = bench.probe(x, y, {"t": (x, test_y)})
    assert r["fitted"] == 39 and r["t_n"] == 39 and r["classes"] == 2
    assert r["t_logistic"] == 1.0  # separable by the first coordinate
    kept = [v for v in test_y if v is not None]
    fitted = [v for v in y if v is not None]
    commonest = max(set(fitted), key=fitted.count)
    assert r["t_majority"] == pytest.approx(kept.count(commonest) / len(kept))


def test_run_and_flags(bench, capsys):
    r = bench.main(["--n-train", "300", "--n-test", "30"])
    for readout in bench.READOUTS:
        for a in ATTRIBUTES:
            for w in ("train_wording", "heldout_wording"):
                for kind in bench.CLASSIFIERS:
                    assert 0.0 <= r[readout][a][f"{w}_{kind}"] <= 1.0
    # the stand-in encoder gives each word its own vector and the digit's name is the same in both wordings
    assert r["mean"]["digit"]["heldout_wording_logistic"] > 0.9
    assert "| mean | logistic | heldout |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--n-train", "0"])
    assert "--n-train must be between 1 and 4000" in capsys.readouterr().err


def test_unwritable_json_is_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.run_bench(lambda: bench.main(["--n-train", "5", "--n-test", "3", "--json",
                                            str(tmp_path / "missing" / "out.json")]), "text_probe.py")
    assert str(exc.value).startswith("text_probe.py: error: cannot write --json ")
    assert not (tmp_path / "missing").exists()


def test_ctrl_c_is_one_line(bench, capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        bench.run_bench(interrupted, "text_probe.py")
    assert exc.value.code == 130
    assert capsys.readouterr().err == "text_probe.py: interrupted\n"
