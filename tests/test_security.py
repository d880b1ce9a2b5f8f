"""Loading is safe: no pickle anywhere in src/, and hostile checkpoints fail fast with a typed error.

Every hostile checkpoint is built here from a real tiny run, the way an attacker or a broken disk
would: some keep the recorded hash consistent (so the deeper checks must catch them), some do not.
Each must raise ``CheckpointError`` naming the file through ``load_checkpoint`` (where the damage
is visible to it), ``load_run``, and the ``sample`` / ``evaluate`` / ``train --resume`` commands, and
the file a pickle would create must never appear.
"""

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from diffusekit.cli import main
from diffusekit.config import load_config
from diffusekit.errors import CheckpointError
from diffusekit.families import open_run as load_run
from diffusekit.io.checkpoint import load_checkpoint, record_hash, save_checkpoint
from diffusekit.train.trainer import Trainer, train

SRC = Path(__file__).resolve().parents[1] / "src"

TOY = ["data.name=moons", "data.n_train=64", "data.n_test=32", "model.kind=mlp", "model.hidden=16",
       "model.depth=1", "diffusion.T=10", "train.batch_size=16", "train.steps=3", "train.log_every=1",
       "train.sample_every=0", "train.checkpoint_every=0", "train.n_sample=4", "train.warmup_steps=1"]
STEM = "step-00000003"


# -- the source scan ----------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
OBJECT_COLLECTIVES = {"all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list"}  # pickle under the hood


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Lines of ``source`` that could unpickle or evaluate untrusted input."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and name in UNSAFE_CALLS:  # builtins, not .eval() methods
                found.append(f"{where} {name}(")
            elif last in OBJECT_COLLECTIVES:
                found.append(f"{where} {name}( pickles objects")
            elif name.endswith("torch.load"):
                if not _kw_is(node, "weights_only", True):
                    found.append(f"{where} {name}( without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw_is(node, "allow_pickle", True):
                found.append(f"{where} {name}(allow_pickle=True)")
            elif name.endswith("yaml.load") or name.endswith("yaml.unsafe_load"):
                found.append(f"{where} {name}(")
            elif name.endswith("jit.load") or name.endswith("torch.package.PackageImporter"):
                found.append(f"{where} {name}( (unpickles)")
    return found


def test_the_scanner_catches_what_it_looks_for():
    bad = ("import pickle\nfrom marshal import loads\nimport torch, numpy as np\nx = torch.load('a')\n"
           "y = torch.load('a', weights_only=False)\nz = np.load('a', allow_pickle=True)\neval('1')\nexec('1')\n"
           "import torch.distributed as dist\ndist.all_gather_object([], 1)\n")
    assert len(unsafe_uses(bad)) == 8
    good = "import torch, numpy as np\nm.eval()\nx = torch.load('a', weights_only=True)\nnp.load('a')\n"
    assert unsafe_uses(good) == []


def test_src_never_unpickles_or_evaluates_strings():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in unsafe_uses(f.read_text(encoding="utf-8"), str(f.relative_to(SRC)))]
    assert problems == []


# -- hostile checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    train(load_config(None, TOY), run, progress=False)
    load_run(run)  # sanity: the untouched run loads
    return run


def _rewrite(run: Path, tensors: dict | None = None, blob: bytes | None = None, update_hash: bool = True,
             **record_changes) -> None:
    """Replace the checkpoint's tensor file and fix up its record, hashes included, as an attacker who knows
    the format would (so that the checks behind the hashes are tested too)."""
    stem = run / "checkpoints" / STEM
    if blob is None:
        blob = st_save(tensors)
    stem.with_suffix(".safetensors").write_bytes(blob)
    record = json.loads(stem.with_suffix(".json").read_text())
    if update_hash:
        record["sha256"] = hashlib.sha256(blob).hexdigest()
        if tensors is not None:
            record["keys"] = sorted(tensors)
    record.update(record_changes)
    if update_hash:
        record["record_sha256"] = record_hash(record)
    stem.with_suffix(".json").write_text(json.dumps(record))


def _tensors(run):
    return dict(load_checkpoint(run)[0])


def _first(t, prefix):
    return next(k for k in sorted(t) if k.startswith(prefix) and t[k].ndim == 2)


class Evil:
    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile(kind: str, run: Path, marker: Path) -> None:
    st = run / "checkpoints" / f"{STEM}.safetensors"
    if kind == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif kind == "truncated_rehashed":
        _rewrite(run, blob=st.read_bytes()[:-100])
    elif kind == "bitflip":
        data = bytearray(st.read_bytes())
        data[len(data) // 2] ^= 0x04
        st.write_bytes(bytes(data))
    elif kind == "oversized_header":
        _rewrite(run, blob=(2**40).to_bytes(8, "little") + b'{"a":' + b" " * 64 + b"}")
    elif kind == "garbage_header":
        _rewrite(run, blob=(16).to_bytes(8, "little") + b'{"x": {"dtype": ' + b"\0" * 32)
    elif kind in ("wrong_shape", "wrong_dtype", "missing_key", "extra_key", "nan", "inf"):
        t = _tensors(run)
        ema, model = _first(t, "ema."), _first(t, "model.")
        if kind == "wrong_shape":
            t[ema] = torch.zeros(t[ema].shape[0] + 1, t[ema].shape[1])
            t[model] = torch.zeros(t[model].shape[0] + 1, t[model].shape[1])
        elif kind == "wrong_dtype":
            t[ema], t[model] = t[ema].double(), t[model].double()
        elif kind == "missing_key":
            del t[ema], t[model]
        elif kind == "extra_key":
            t["ema.backdoor.weight"] = torch.zeros(2)
            t["model.backdoor.weight"] = torch.zeros(2)
        else:
            t[ema] = t[ema].clone()
            t[ema][0, 0] = float("nan") if kind == "nan" else float("inf")
        _rewrite(run, t)
    elif kind == "pickle":
        Evil.marker = marker
        _rewrite(run, blob=pickle.dumps({"model.w": Evil()}))
    elif kind == "torch_save_pickle":  # what torch.save would write: a zip of pickles
        import io

        Evil.marker = marker
        buf = io.BytesIO()
        torch.save({"w": Evil()}, buf)
        _rewrite(run, blob=buf.getvalue())
    elif kind == "pointer_outside":
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": "../../elsewhere/step-00000003"}))
    elif kind == "pointer_absolute":
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": "/etc/passwd"}))
    elif kind == "pointer_not_json":
        (run / "checkpoints" / "latest.json").write_bytes(b"\xff\xfe garbage")
    elif kind == "symlink":
        outside = run.parent / f"outside-{run.name}.safetensors"
        shutil.copy(st, outside)
        st.unlink()
        st.symlink_to(outside)
    elif kind == "record_wrong_step":
        _rewrite(run, blob=st.read_bytes(), step=7)
    elif kind == "record_bad_types":
        _rewrite(run, blob=st.read_bytes(), keys="model.w")
    elif kind == "record_bad_config":  # a config that fails validation, under a recomputed record hash
        record_path = run / "checkpoints" / f"{STEM}.json"
        record = json.loads(record_path.read_text())
        record["meta"]["config"]["model"]["hidden"] = -5
        record["record_sha256"] = record_hash(record)
        record_path.write_text(json.dumps(record))
    elif kind in ("record_edited_schedule", "record_edited_prediction"):  # a hand edit of the recorded config
        record_path = run / "checkpoints" / f"{STEM}.json"
        record = json.loads(record_path.read_text())
        if kind == "record_edited_schedule":
            record["meta"]["config"]["diffusion"]["beta_end"] = 0.5
        else:
            record["meta"]["config"]["model"]["prediction"] = "x0"
        record_path.write_text(json.dumps(record, indent=1, sort_keys=True))

    else:
        raise AssertionError(kind)


# kind -> (the file the message must name, whether load_checkpoint itself must refuse it)
HOSTILE = {
    "truncated": (f"{STEM}.safetensors", True),
    "truncated_rehashed": (f"{STEM}.safetensors", True),
    "bitflip": (f"{STEM}.safetensors", True),
    "oversized_header": (f"{STEM}.safetensors", True),
    "garbage_header": (f"{STEM}.safetensors", True),
    "wrong_shape": (f"{STEM}.safetensors", False),
    "wrong_dtype": (f"{STEM}.safetensors", False),
    "missing_key": (f"{STEM}.safetensors", False),
    "extra_key": (f"{STEM}.safetensors", False),
    "nan": (f"{STEM}.safetensors", True),
    "inf": (f"{STEM}.safetensors", True),
    "pickle": (f"{STEM}.safetensors", True),
    "torch_save_pickle": (f"{STEM}.safetensors", True),
    "pointer_outside": ("latest.json", True),
    "pointer_absolute": ("latest.json", True),
    "pointer_not_json": ("latest.json", True),
    "symlink": (f"{STEM}.safetensors", True),
    "record_wrong_step": (f"{STEM}.json", True),
    "record_bad_types": (f"{STEM}.json", True),
    "record_bad_config": (f"{STEM}.json", False),
    "record_edited_schedule": (f"{STEM}.json", True),
    "record_edited_prediction": (f"{STEM}.json", True),
}


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_checkpoint_fails_fast_everywhere(kind, good_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "PWNED"
    hostile(kind, run, marker)
    needle, at_load = HOSTILE[kind]

    if at_load:
        with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
            load_checkpoint(run)
    else:
        load_checkpoint(run)  # consistent file: the model-aware loaders must catch it
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_run(run)
    for argv in (["sample", "--run", run, "--seeds", "0-1", "--out", tmp_path / "s"],
                 ["evaluate", "--run", run, "--metrics", "bpd"],
                 ["train", "--resume", "--out", run]):
        code, err = _cli(capsys, *argv, "--no-progress")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv[0], err)
        assert needle in lines[0] and "CheckpointError" not in lines[0], (argv[0], lines[0])
    assert not marker.exists()
    assert not (tmp_path / "s").exists()


def test_resume_is_all_or_nothing(good_run, tmp_path):
    """A checkpoint that fails a late check (optimizer moments of the wrong shape) leaves the trainer
    exactly as it was: no weights, EMA, RNG or step taken from it."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    t = _tensors(run)
    key = next(k for k in sorted(t) if k.startswith("optim.") and k.endswith("exp_avg") and t[k].ndim == 2)
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
    _rewrite(run, t)
    trainer = Trainer(load_config(None, TOY), tmp_path / "fresh", progress=False)
    before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    trainer.run_dir = run
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        trainer._resume()
    after = trainer.state_tensors()
    assert trainer.step == 0 and trainer.ema.updates == 0 and trainer.optimizer.state == {}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_pickle_beside_the_checkpoint_is_never_read(good_run, tmp_path):
    """Files a user might expect to be loaded (model.pt, *.pkl) are not looked at."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "PWNED"
    Evil.marker = marker
    for name in ("model.pt", "checkpoints/step-00000009.pt", "checkpoints/latest.pkl"):
        (run / name).write_bytes(pickle.dumps(Evil()))
    assert load_run(run).step == 3
    assert not marker.exists()


def test_save_refuses_non_finite_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="model.w"):
        save_checkpoint(tmp_path, 1, {"model.w": torch.tensor([1.0, float("nan")]), "model.b": torch.zeros(1)}, {})
    assert not (tmp_path / "checkpoints" / "step-00000001.safetensors").exists()
