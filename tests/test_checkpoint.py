"""Checkpoints: round trip, atomic pointer, and loud failures on damaged files."""

import json
import pickle

import pytest
import torch

from diffusekit.errors import CheckpointError
from diffusekit.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, record_hash, save_checkpoint


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(4, 3, generator=g), "model.b": torch.zeros(3), "rng.torch": torch.get_rng_state()}


def test_round_trip_is_bit_exact(tmp_path):
    t = _tensors()
    save_checkpoint(tmp_path, 5, t, {"note": "x"})
    loaded, record = load_checkpoint(tmp_path / "checkpoints" / "step-00000005")
    assert record["step"] == 5 and record["meta"] == {"note": "x"}
    for k, v in t.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert load_checkpoint(tmp_path)[1]["step"] == 5  # a run folder loads its latest


def test_keeps_newest_and_points_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _tensors(step), {}, keep=2)
    assert list_checkpoints(tmp_path) == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_leftover_temporary_files_are_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(), {})
    junk = tmp_path / "checkpoints" / ".step-00000002.safetensors.123.tmp"
    junk.write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert junk.exists()  # readers never delete: the file may belong to a writer still at work
    save_checkpoint(tmp_path, 2, _tensors(), {})  # the writer cleans
    assert not junk.exists()


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bitflip":
        data[len(data) - 5] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncate", "bitflip", "empty"])
def test_damaged_tensor_file_fails_naming_the_file(tmp_path, how):
    stem = save_checkpoint(tmp_path, 1, _tensors(), {})
    _damage(stem.with_suffix(".safetensors"), how)
    with pytest.raises(CheckpointError, match="step-00000001.safetensors"):
        load_checkpoint(stem)


def test_a_damaged_latest_is_an_error_not_a_silent_fallback(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(1), {})
    stem = save_checkpoint(tmp_path, 2, _tensors(2), {})
    _damage(stem.with_suffix(".safetensors"), "bitflip")
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    with pytest.raises(CheckpointError, match="step-00000002.safetensors"):
        load_checkpoint(tmp_path)


def test_bad_records_fail_loudly(tmp_path):
    stem = save_checkpoint(tmp_path, 1, _tensors(), {})
    js = stem.with_suffix(".json")
    record = json.loads(js.read_text())
    js.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a diffusekit checkpoint"):
        load_checkpoint(stem)
    js.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(stem)
    js.write_text(json.dumps({**record, "keys": record["keys"] + ["extra"]}))
    with pytest.raises(CheckpointError, match="does not match its hash"):  # any edit of the record
        load_checkpoint(stem)
    edited = {**record, "keys": record["keys"] + ["extra"]}
    js.write_text(json.dumps({**edited, "record_sha256": record_hash(edited)}))  # edited and re-hashed
    with pytest.raises(CheckpointError, match="keys differ"):
        load_checkpoint(stem)
    stem.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(stem)


def test_a_pickle_in_place_of_tensors_is_rejected_without_running_it(tmp_path):
    stem = save_checkpoint(tmp_path, 1, _tensors(), {})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps(Evil())
    stem.with_suffix(".safetensors").write_bytes(blob)
    js = stem.with_suffix(".json")
    import hashlib

    record = {**json.loads(js.read_text()), "sha256": hashlib.sha256(blob).hexdigest()}
    js.write_text(json.dumps({**record, "record_sha256": record_hash(record)}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(stem)
    assert not marker.exists()


def test_oversized_header_is_rejected(tmp_path):
    stem = save_checkpoint(tmp_path, 1, _tensors(), {})
    blob = (2**40).to_bytes(8, "little") + b"{}"
    stem.with_suffix(".safetensors").write_bytes(blob)
    js = stem.with_suffix(".json")
    import hashlib

    record = {**json.loads(js.read_text()), "sha256": hashlib.sha256(blob).hexdigest()}
    js.write_text(json.dumps({**record, "record_sha256": record_hash(record)}))
    with pytest.raises(CheckpointError, match="header"):
        load_checkpoint(stem)
