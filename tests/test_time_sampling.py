"""Importance sampling of t (``loss.t_sampling = "importance"``, ``diffusekit.timestep_proposal``): exact
answers on known per-t loss tables first, then the trainer (resume, the logged spread, bad keys); then the
same for continuous t (the binned proposal of the continuous objective) on the exact ELBO integrand of
Gaussian data."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoints

from diffusekit.config import load_config
from diffusekit.continuous import CosineLogSNR, diffusion_term, prior_kl_at, reconstruction_nll, sample_times
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.checkpoint import load_checkpoint, record_hash
from diffusekit.timestep_proposal import (
    TIME_BINS,
    BinnedTimeProposal,
    LossHistory,
    bin_density,
    draw_binned_times,
    estimator_variance,
    importance_weights,
    proposal,
    time_bins,
)
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
    (["loss.t_sampling=importance", "loss.objective=continuous", "loss.weighting=elbo",
      "diffusion.learned_schedule=true"], "loss.t_sampling"),
    (["loss.t_sampling=often"], "loss.t_sampling"),
])
def test_bad_keys_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)



# -- continuous t: the binned proposal (``BinnedTimeProposal``) -------------------------------------------------
S2, LAM = 0.25, 8.0  # data N(m, S2) per dimension; the schedule's log-SNR runs over [-LAM, LAM]
SCHEDULE = CosineLogSNR(-LAM, LAM)


def elbo_integrand(t):
    """E_{x, eps} of the diffusion integrand 1/2 (-lambda'(t)) ||eps - eps_hat||^2 per dimension for Gaussian data
    N(m, S2) and the exact denoiser: E (eps - E[eps|z])^2 = Var(eps | z) = 1 - sigma^2 / (alpha^2 S2 + sigma^2)
    = S2 / (S2 + e^-lambda). Its integral over t is 1/2 [log(1 + S2 e^lambda)] between the end points."""
    lam, dlam = SCHEDULE(t)
    return 0.5 * (-dlam) * S2 / (S2 + torch.exp(-lam))


EXACT = 0.5 * (math.log1p(S2 * math.exp(LAM)) - math.log1p(S2 * math.exp(-LAM)))


def bin_moments(f, B=TIME_BINS, n=16):
    """(E[f | bin], E[f^2 | bin]) for t uniform in each of B bins, by n-point Gauss-Legendre per bin."""
    x, w = np.polynomial.legendre.leggauss(n)
    nodes = (torch.arange(B, dtype=F64)[:, None] + torch.tensor((x + 1) / 2, dtype=F64)) / B
    values, weights = f(nodes.reshape(-1)).reshape(B, n), torch.tensor(w / 2, dtype=F64)
    return (values * weights).sum(1), (values ** 2 * weights).sum(1)


def _masses(seed, B=TIME_BINS, share=0.2):
    return proposal(torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=F64) * 4, share)


def test_the_gaussian_elbo_integrand_integrates_to_its_closed_form():
    mean, _ = bin_moments(elbo_integrand)
    torch.testing.assert_close(mean.mean(), torch.tensor(EXACT, dtype=F64), rtol=1e-13, atol=0)


def test_the_binned_estimator_is_unbiased_for_the_continuous_integral():
    """E_{t~q}[L(t) / q(t)] = int_0^1 L(t) dt for a fixed non-uniform q, by Monte Carlo (2^18 draws, within 5 standard
    errors; the standard error is below 0.5% of the integral) on the exact ELBO integrand of Gaussian data."""
    p = _masses(0)
    t, b = draw_binned_times(p, 2 ** 18, torch.Generator().manual_seed(1))
    values = elbo_integrand(t) / bin_density(p, t)
    mean, stderr = values.mean(), values.std() / math.sqrt(values.numel())
    assert abs(float(mean) - EXACT) < 5 * float(stderr) < 0.025 * EXACT
    torch.testing.assert_close(1 / bin_density(p, t), importance_weights(p, b + 1), rtol=1e-15, atol=0)


def test_the_binned_variance_matches_its_closed_form_and_the_optimum_beats_uniform():
    """Var_q[L(t) / q(t)] = sum_b m_b / (B^2 P_b) - L^2 (m_b = E[L^2 | bin b]) for uniform, the optimum
    P_b proportional to sqrt(m_b) and a mixed one, by Monte Carlo within 5 standard errors of the variance;
    the optimum is (mean_b sqrt(m_b))^2 - L^2, below uniform's int L^2 - L^2 (here by a factor > 500) and below
    every perturbation of it."""
    mean, m2 = bin_moments(elbo_integrand)
    B, L = m2.numel(), mean.mean()
    uniform, best = torch.full((B,), 1 / B, dtype=F64), proposal(m2, 0.0)
    for seed, p in enumerate((uniform, best, proposal(m2, 0.05))):
        closed = estimator_variance(m2, mean, p)
        torch.testing.assert_close(closed, (m2 / (B ** 2 * p)).sum() - L ** 2, rtol=1e-13, atol=0)
        t, _ = draw_binned_times(p, 2 ** 18, torch.Generator().manual_seed(10 + seed))
        v = elbo_integrand(t) / bin_density(p, t)
        c = v - v.mean()
        var, var_se = c.pow(2).mean(), ((c.pow(4).mean() - c.pow(2).mean() ** 2) / v.numel()).sqrt()
        assert abs(float(var - closed)) < 5 * float(var_se), (seed, float(var), float(closed))
    flat, opt = estimator_variance(m2, mean, uniform), estimator_variance(m2, mean, best)
    torch.testing.assert_close(flat, m2.mean() - L ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt, m2.sqrt().mean() ** 2 - L ** 2, rtol=1e-9, atol=1e-12)
    assert 0 < opt < flat / 500
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        other = best * torch.exp(0.3 * torch.randn(B, generator=gen, dtype=F64))
        assert estimator_variance(m2, mean, other / other.sum()) > opt


def test_the_binned_density_integrates_to_one_is_floored_and_draws_are_deterministic():
    """q integrates to 1 (exactly: midpoints of every bin), q >= u everywhere (bins without loss included, t = 0
    and t = 1), every t lies in its drawn bin, bins come with frequencies P_b and t is uniform inside them;
    the same generator seed draws the same (t, b), another does not."""
    u = 0.01
    m2 = torch.rand(TIME_BINS, generator=torch.Generator().manual_seed(2), dtype=F64)
    m2[::7] = 0.0
    p = proposal(m2, u)
    grid = (torch.arange(TIME_BINS * 10, dtype=F64) + 0.5) / (TIME_BINS * 10)
    torch.testing.assert_close(bin_density(p, grid).mean(), torch.tensor(1.0, dtype=F64), rtol=1e-14, atol=0)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert float(bin_density(p, torch.cat([grid, ends])).min()) >= u * (1 - 1e-12)
    assert torch.equal(bin_density(p, ends), TIME_BINS * p[[0, -1]])
    n = 2 ** 17
    t, b = draw_binned_times(p, n, torch.Generator().manual_seed(3))
    again = draw_binned_times(p, n, torch.Generator().manual_seed(3))
    assert torch.equal(t, again[0]) and torch.equal(b, again[1])
    assert not torch.equal(t, draw_binned_times(p, n, torch.Generator().manual_seed(4))[0])
    assert torch.equal(time_bins(t, TIME_BINS), b) and bool(((t >= 0) & (t < 1)).all())
    freq = torch.bincount(b, minlength=TIME_BINS).to(F64) / n
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all())
    offset = t * TIME_BINS - b  # uniform on [0, 1): mean 1/2, variance 1/12
    assert abs(float(offset.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(offset.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)


def test_the_binned_warm_up_is_uniform_sampling_until_every_bin_has_its_history():
    """Before every bin holds ``per_bin`` losses, t, the bins and the weights are those of t ~ U(0, 1)
    (``sample_times(..., "uniform")``, weight 1); after, P_b = (1 - u) rms_b / sum rms + u / B exactly, from
    the last ``per_bin`` losses of each bin, and the weight of each draw is 1 / q(t)."""
    bins, per_bin, u = 5, 2, 0.1
    history = BinnedTimeProposal(per_bin, u, bins)
    gen, seen = torch.Generator().manual_seed(0), {b: [] for b in range(bins)}
    while not history.full:
        assert torch.equal(history.proposal(), torch.full((bins,), 1 / bins, dtype=F64))
        state = gen.get_state()
        t, b, w = history.draw(4, gen)
        assert torch.equal(t, sample_times(4, torch.Generator().set_state(state), "uniform"))
        assert torch.equal(b, time_bins(t, bins)) and torch.equal(w, torch.ones(4, dtype=F64))
        losses = elbo_integrand(t)
        history.update(b, losses)
        for bi, li in zip(b.tolist(), losses.tolist()):
            seen[bi].append(li)
    last = torch.tensor([seen[b][-per_bin:] for b in range(bins)], dtype=F64)
    rms = last.pow(2).mean(1).sqrt()
    torch.testing.assert_close(history.proposal(), (1 - u) * rms / rms.sum() + u / bins, rtol=1e-15, atol=0)
    t, b, w = history.draw(64, torch.Generator().manual_seed(1))
    assert torch.equal(b, time_bins(t, bins))
    torch.testing.assert_close(w, 1 / history.density(t), rtol=1e-15, atol=0)


CTOY = ["data.name=moons", "data.n_train=256", "data.n_test=64", "model.kind=mlp", "model.hidden=32",
        "model.depth=2", "diffusion.T=40", "train.batch_size=64", "train.log_every=1", "train.sample_every=0",
        "train.checkpoint_every=5", "train.warmup_steps=2", "train.n_sample=8", "train.lr=1e-2",
        "loss.objective=continuous", "loss.weighting=elbo", "diffusion.schedule=cosine",
        "diffusion.logsnr_min=-8", "diffusion.logsnr_max=8"]
CIMPORTANCE = ["loss.t_sampling=importance", "loss.importance_history=1", "loss.importance_uniform=0.1"]


def test_until_the_history_fills_a_continuous_importance_run_is_the_uniform_run(tmp_path):
    train(load_config(None, CTOY + ["train.steps=3"]), tmp_path / "u", progress=False)
    train(load_config(None, CTOY + ["train.steps=3", "loss.t_sampling=importance", "loss.importance_history=50"]),
          tmp_path / "i", progress=False)
    tu, _ = load_checkpoint(tmp_path / "u")
    ti, _ = load_checkpoint(tmp_path / "i")
    assert {k for k in ti if k.startswith("objective.")} == {"objective.t_history.values", "objective.t_history.counts"}
    assert ti["objective.t_history.values"].shape == (TIME_BINS, 50)
    assert int(ti["objective.t_history.counts"].sum()) == 3 * 64
    assert not any(k.startswith("objective.") for k in tu)
    for k in tu:
        assert torch.equal(tu[k], ti[k]), k
    logs = [[{k: r[k] for k in ("loss", "loss_std", "grad_norm")} for r in map(json.loads, (run / "log.jsonl").open())]
            for run in (tmp_path / "u", tmp_path / "i")]
    assert logs[0] == logs[1]


def test_a_continuous_importance_run_resumes_bit_for_bit(tmp_path):
    """14 steps straight equal 10 steps (checkpoints at 5 and 10) resumed to 14; the history is full before
    step 10 (with 100 bins, one loss each and 64 examples a step), so both sides of the checkpoint drew t from
    the proposal."""
    full = load_config(None, CTOY + CIMPORTANCE + ["train.steps=14"])
    train(full, tmp_path / "a", progress=False)
    train(load_config(None, CTOY + CIMPORTANCE + ["train.steps=10"]), tmp_path / "b", progress=False)
    middle, _ = load_checkpoint(tmp_path / "b")
    assert bool((middle["objective.t_history.counts"] == 1).all())
    train(full, tmp_path / "b", resume=True, progress=False)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 14)
    log_a, log_b = ([json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab")
    assert [(r["loss"], r["loss_std"]) for r in log_a] == [(r["loss"], r["loss_std"]) for r in log_b]


def test_the_continuous_loss_is_the_t_free_terms_plus_the_weighted_diffusion_term(tmp_path):
    """With a full history the objective returns C + D(t) / q(t) per example, C = prior + reconstruction and
    D = ``diffusion_term`` in bits/dim, recomputed here from the same draws (float32 tolerance); it appends the
    unweighted D to the history; and the logged ``loss_std`` is the std of these weighted losses."""
    trainer = Trainer(load_config(None, CTOY + CIMPORTANCE + ["train.steps=12"]), tmp_path, progress=False)
    objective, seen, checked = trainer.objective, [], []
    loss = objective.loss

    def recording(module, x0, labels, generator):
        history = objective.t_history
        proposal_before, full = history.proposal(), history.full
        state = generator.get_state()
        out = loss(module, x0, labels, generator)
        seen.append(out.detach().double())
        if not full:
            return out
        g = torch.Generator().set_state(state)
        t, b = draw_binned_times(proposal_before, x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g)
        m = objective.module
        lam, dlam = m.schedule(t)
        bits = x0[0].numel() * math.log(2.0)
        with torch.no_grad():
            d = diffusion_term(m.denoiser, x0, lam, dlam, noise).double() / bits
        c = (prior_kl_at(x0, -LAM) + reconstruction_nll(x0, LAM, noise, None)) / bits
        torch.testing.assert_close(out.detach().double(), c + d / bin_density(proposal_before, t), rtol=2e-5, atol=1e-5)
        counts = history.history.counts
        rows = history.history.values[b, counts[b] - 1]  # per_bin = 1: the newest value of each drawn bin
        last = {bi: di for bi, di in zip(b.tolist(), d.tolist())}  # a bin drawn twice keeps its later value
        torch.testing.assert_close(rows, torch.tensor([last[bi] for bi in b.tolist()], dtype=F64), rtol=1e-4,
                                   atol=1e-4)
        checked.append(True)
        return out

    objective.loss = recording
    try:
        trainer.run()
    finally:
        trainer.close()
    assert len(seen) == 12 and len(checked) >= 3  # the history is full from step 9 on
    stds = [json.loads(x)["loss_std"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert stds == pytest.approx([float(s.std()) for s in seen], rel=1e-9)


def test_a_fixed_schedule_allows_continuous_importance_sampling():
    cfg = load_config(None, CTOY + CIMPORTANCE)
    assert cfg.loss.t_sampling == "importance" and not cfg.diffusion.learned_schedule


def test_a_continuous_t_history_that_does_not_fit_is_a_one_line_error(tmp_path):
    trainer = Trainer(load_config(None, CTOY + CIMPORTANCE + ["train.steps=1"]), tmp_path, progress=False)
    try:
        good = trainer.objective.state_tensors()
        assert set(good) == {"t_history.values", "t_history.counts"} and good["t_history.values"].shape == (TIME_BINS, 1)
        for name, bad in (("counts", good["t_history.counts"] + 2), ("values", torch.zeros(TIME_BINS + 1, 1, dtype=F64))):
            with pytest.raises(CheckpointError, match=f"step-7.safetensors: t history {name}") as err:
                trainer.objective.load_state_tensors({**good, f"t_history.{name}": bad}, "step-7.safetensors")
            assert "\n" not in str(err.value)
    finally:
        trainer.close()
