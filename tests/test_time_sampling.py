"""Importance sampling of t (``loss.t_sampling = "importance"``, ``diffusekit.timestep_proposal``): exact
answers on known per-t loss tables first, then the trainer (resume, the logged spread, bad keys)."""

import hashlib
import json

import pytest
import torch
from conftest import assert_same_checkpoints

from diffusekit.config import load_config
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.checkpoint import load_checkpoint, record_hash
from diffusekit.timestep_proposal import LossHistory, estimator_variance, importance_weights, proposal
from diffusekit.train.trainer import Trainer, train

F64 = torch.float64
TOY = ["data.name=moons", "data.n_train=256", "data.n_test=64", "model.kind=mlp", "model.hidden=32",
       "model.depth=2", "diffusion.T=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
       "train.checkpoint_every=3", "train.warmup_steps=2", "train.n_sample=8", "loss.weighting=elbo"]
IMPORTANCE = ["loss.t_sampling=importance", "loss.importance_history=2", "loss.importance_uniform=0.1"]


def _table(T=7, seed=0):
    return torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3 + 0.1


def test_the_reweighted_estimator_is_unbiased_by_enumeration():
    """E_{t~p}[L_t / (T p_t)] = sum_t p_t L_t / (T p_t) = mean_t L_t, for the optimal proposal, a mixed one and
    an arbitrary one."""
    L = _table()
    t = torch.arange(1, L.numel() + 1)
    arbitrary = torch.rand(L.numel(), generator=torch.Generator().manual_seed(1), dtype=F64) + 0.01
    for p in (proposal(L ** 2, 0.0), proposal(L ** 2, 0.3), arbitrary / arbitrary.sum()):
        expectation = (p * L * importance_weights(p, t)).sum()
        torch.testing.assert_close(expectation, L.mean(), rtol=1e-14, atol=0)


def test_the_proposal_of_a_full_history_is_proportional_to_the_root_mean_square_loss():
    """The history keeps the last ``per_t`` values of each t in order (older ones dropped); once every t has
    them, p_t = (1 - u) sqrt(mean L_t^2) / sum_s sqrt(mean L_s^2) + u / T exactly; before, p is uniform."""
    T, per_t, u = 4, 3, 0.2
    history = LossHistory(T, per_t, u)
    seen = {t: [] for t in range(1, T + 1)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        t = torch.randint(1, T + 1, (5,), generator=gen)
        losses = torch.rand(5, generator=gen, dtype=F64)
        if not history.full:
            assert torch.equal(history.proposal(), torch.full((T,), 1 / T, dtype=F64))
        history.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            seen[ti].append(li)
    assert history.full
    last = torch.tensor([seen[t][-per_t:] for t in range(1, T + 1)], dtype=F64)
    assert torch.equal(history.values, last)
    rms = last.pow(2).mean(1).sqrt()
    torch.testing.assert_close(history.proposal(), (1 - u) * rms / rms.sum() + u / T, rtol=1e-15, atol=0)
    torch.testing.assert_close(proposal(last.pow(2).mean(1), 0.0), rms / rms.sum(), rtol=1e-15, atol=0)


def test_an_unfilled_history_draws_t_exactly_as_uniform_sampling():
    history = LossHistory(10, 5, 0.001)
    t, w = history.draw(16, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(1, 11, (16,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(w, torch.ones(16, dtype=F64))


def test_the_variance_matches_its_closed_form_and_the_optimum_beats_uniform():
    """Each t has two equally likely losses a_t, b_t. By enumeration over (t, value), the variance of the
    weighted estimate equals sum_t E[L_t^2] / (T^2 p_t) - L^2 for any p; p* (proportional to sqrt(E[L_t^2]))
    gives (mean_t sqrt(E[L_t^2]))^2 - L^2, below uniform's mean_t E[L_t^2] - L^2; with one value per t, 0."""
    a, b = _table(seed=2), _table(seed=3)
    T = a.numel()
    t = torch.arange(1, T + 1)
    m2, mean = (a ** 2 + b ** 2) / 2, (a + b) / 2
    L = mean.mean()
    uniform = torch.full((T,), 1 / T, dtype=F64)
    for p in (uniform, proposal(m2, 0.0), proposal(m2, 0.05)):
        w = importance_weights(p, t)
        enumerated = (p * ((a * w) ** 2 + (b * w) ** 2) / 2).sum() - L ** 2
        closed = (m2 / (T ** 2 * p)).sum() - L ** 2
        torch.testing.assert_close(estimator_variance(m2, mean, p), enumerated, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(estimator_variance(m2, mean, p), closed, rtol=1e-14, atol=0)
    best, flat = estimator_variance(m2, mean, proposal(m2, 0.0)), estimator_variance(m2, mean, uniform)
    torch.testing.assert_close(best, m2.sqrt().mean() ** 2 - L ** 2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(flat, m2.mean() - L ** 2, rtol=1e-12, atol=1e-15)
    assert best < flat
    fixed = estimator_variance(a ** 2, a, proposal(a ** 2, 0.0))  # deterministic L_t: a zero-variance proposal
    assert abs(float(fixed)) < 1e-14 < float(estimator_variance(a ** 2, a, uniform))


def test_until_the_history_fills_an_importance_run_is_the_uniform_run(tmp_path):
    """With a history too long to fill in 3 steps, t, noise and losses are those of loss.t_sampling = uniform:
    the weights and logs are bit-for-bit the same, and only the importance run checkpoints a t history."""
    train(load_config(None, TOY + ["train.steps=3"]), tmp_path / "u", progress=False)
    train(load_config(None, TOY + ["train.steps=3", "loss.t_sampling=importance", "loss.importance_history=50"]),
          tmp_path / "i", progress=False)
    tu, _ = load_checkpoint(tmp_path / "u")
    ti, _ = load_checkpoint(tmp_path / "i")
    assert not any(k.startswith("objective.") for k in tu)
    assert {k for k in ti if k.startswith("objective.")} == {"objective.t_history.values", "objective.t_history.counts"}
    assert int(ti["objective.t_history.counts"].sum()) == 3 * 32
    for k in tu:
        assert torch.equal(tu[k], ti[k]), k
    logs = [[{k: r[k] for k in ("loss", "loss_std", "grad_norm")} for r in map(json.loads, (run / "log.jsonl").open())]
            for run in (tmp_path / "u", tmp_path / "i")]
    assert logs[0] == logs[1]


def test_an_importance_run_resumes_bit_for_bit(tmp_path):
    """10 steps straight equal 6 steps (checkpoints at 3 and 6) resumed to 10: weights, optimizer, RNGs and
    the t history (full, so t was drawn from the proposal on both sides of the checkpoint), and the log."""
    full = load_config(None, TOY + IMPORTANCE + ["train.steps=10"])
    train(full, tmp_path / "a", progress=False)
    train(load_config(None, TOY + IMPORTANCE + ["train.steps=6"]), tmp_path / "b", progress=False)
    first, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000003")
    assert bool((first["objective.t_history.counts"] == 2).all())  # importance draws before the checkpoint at 6
    train(full, tmp_path / "b", resume=True, progress=False)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 10)
    log_a, log_b = ([json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab")
    assert [(r["loss"], r["loss_std"]) for r in log_a] == [(r["loss"], r["loss_std"]) for r in log_b]


def test_the_logged_spread_is_the_batch_std_of_the_weighted_per_example_losses(tmp_path):
    """``loss_std`` (log_every = 1) is the unbiased std of what the objective returned, weights included."""
    trainer = Trainer(load_config(None, TOY + IMPORTANCE + ["train.steps=3"]), tmp_path, progress=False)
    seen = []
    loss = trainer.objective.loss

    def recording(*args, **kwargs):
        out = loss(*args, **kwargs)
        seen.append(out.detach().double())
        return out

    trainer.objective.loss = recording
    try:
        trainer.run()
    finally:
        trainer.close()
    stds = [json.loads(x)["loss_std"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert stds == pytest.approx([float(s.std()) for s in seen], rel=1e-9)
    assert trainer.objective.t_history.full  # the last steps were importance-weighted


def test_a_damaged_t_history_is_a_one_line_error(tmp_path):
    from safetensors.torch import save

    train(load_config(None, TOY + IMPORTANCE + ["train.steps=3"]), tmp_path, progress=False)
    tensors, record = load_checkpoint(tmp_path)
    tensors["objective.t_history.counts"] = tensors["objective.t_history.counts"] + 5
    stem = tmp_path / "checkpoints" / f"step-{record['step']:08d}"
    blob = save(tensors)
    stem.with_suffix(".safetensors").write_bytes(blob)
    record.update(sha256=hashlib.sha256(blob).hexdigest(), keys=sorted(tensors))
    record["record_sha256"] = record_hash(record)
    stem.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="t history counts") as err:
        Trainer(load_config(None, TOY + IMPORTANCE + ["train.steps=5"]), tmp_path, resume=True, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["loss.importance_history=0"], "loss.importance_history"),
    (["loss.importance_history=2.5"], "loss.importance_history"),
    (["loss.importance_uniform=0"], "loss.importance_uniform"),
    (["loss.importance_uniform=1.5"], "loss.importance_uniform"),
    (["loss.t_sampling=importance", "model.kind=vae"], "loss.t_sampling"),
    (["loss.t_sampling=importance", "loss.objective=continuous", "loss.weighting=elbo"], "loss.t_sampling"),
    (["loss.t_sampling=often"], "loss.t_sampling"),
])
def test_bad_keys_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)
