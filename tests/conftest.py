"""Fixtures shared by several test files."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _folder_cache_in_tmp(tmp_path_factory):
    """Decoded image folders are cached in a temporary folder for the session, never in ~/.cache."""
    old = os.environ.get("DIFFUSEKIT_FOLDER_CACHE")
    os.environ["DIFFUSEKIT_FOLDER_CACHE"] = str(tmp_path_factory.mktemp("folder-cache"))
    yield
    if old is None:
        os.environ.pop("DIFFUSEKIT_FOLDER_CACHE", None)
    else:
        os.environ["DIFFUSEKIT_FOLDER_CACHE"] = old


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache folder (``<root>/features``) holding the digits feature net, trained once per session
    (~10 s); point ``DIFFUSEKIT_CACHE`` at its parent to make the library use it."""
    from diffusekit.evaluate.features import load_feature_net

    folder = tmp_path_factory.mktemp("cache") / "features"
    load_feature_net("digits", cache_dir=folder)
    return folder


def fake_data(shape, levels=17, num_classes=0, n=4):
    """A dataset of ``n`` zero examples of per-example ``shape`` (what objectives read: shape, levels, labels)."""
    import torch

    from diffusekit.data.dataset import ArrayDataset

    labels = torch.zeros(n, dtype=torch.int64) if num_classes else None
    return ArrayDataset(torch.zeros(n, *shape), labels, levels, num_classes, "fake")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny unconditional digits run (test_cli.TINY: 3 steps, T = 20), trained once per test module."""
    from test_cli import TINY

    from diffusekit.cli import main

    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", *TINY, "--out", str(out), "--no-progress"]) == 0
    return out


def assert_same_checkpoints(a, b, step: int) -> dict:
    """The newest checkpoints of run folders ``a`` and ``b`` are both at ``step`` and hold the same tensors
    bit for bit (a resumed run against one trained straight through); returns ``a``'s tensors."""
    import torch

    from diffusekit.io.checkpoint import load_checkpoint

    (ta, ra), (tb, rb) = load_checkpoint(a), load_checkpoint(b)
    assert ra["step"] == rb["step"] == step and sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    return ta
