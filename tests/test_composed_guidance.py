"""Composed prompts (the AND of Liu et al. 2022): ``ComposedGuidance`` against exact answers, and the clause
features of " AND " prompts (``latent.sampling``).

The exact case: x = (x1, x2) with independent coordinates, each a 1-D two-component mixture, and clause k
naming the component of coordinate k. Given x_t the two coordinates stay independent, so the clauses are
independent given x_t and the AND at scale 1 is the exact conditional p(x | c1, c2) at every noise level:
the composed prediction must equal that Gaussian's own denoiser, and the sampler its chain.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.latent.sampling import ClauseFeatures, check_prompts, clause_features, is_composed, split_clauses
from diffusekit.oracle import GaussianMixture
from diffusekit.parameterization import Prediction
from diffusekit.sampling.generate import generate
from diffusekit.sampling.guidance import ClassifierFreeGuidance, ComposedGuidance
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import make_schedule
from diffusekit.text import TextFeatures

F64 = torch.float64
# coordinate k's mixture: weights, means, variances of its two components
COORDS = [(torch.tensor([0.3, 0.7]), torch.tensor([-1.5, 1.0]), torch.tensor([0.2, 0.5])),
          (torch.tensor([0.5, 0.5]), torch.tensor([0.8, -0.6]), torch.tensor([0.1, 0.3]))]


def product(c1: int, c2: int) -> GaussianMixture:
    """p(x) restricted to component c1 of x1 (-1: any) and c2 of x2 (-1: any): a product of 1-D mixtures."""
    picks = [range(2) if c < 0 else [c] for c in (c1, c2)]
    weights, means, covs = [], [], []
    for i, j in itertools.product(*picks):
        w = (COORDS[0][0][i] if c1 < 0 else 1.0) * (COORDS[1][0][j] if c2 < 0 else 1.0)
        weights.append(float(w))
        means.append([COORDS[0][1][i], COORDS[1][1][j]])
        covs.append(torch.diag(torch.tensor([COORDS[0][2][i], COORDS[1][2][j]])))
    return GaussianMixture(torch.tensor(weights), torch.tensor(means), torch.stack(covs))


class ClauseOracle:
    """The exact denoiser of p(x | condition): cond["context"] (B, 2) holds (c1, c2), -1 where unnamed. Records the
    rows of every call."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x_t, logsnr, cond=None) -> Prediction:
        n = x_t.shape[0]
        self.batches.append(n)
        codes = cond["context"].long()
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(n)
        eps, x0 = torch.empty_like(x_t), torch.empty_like(x_t)
        for c1, c2 in {tuple(r) for r in codes.tolist()}:
            rows = (codes[:, 0] == c1) & (codes[:, 1] == c2)
            pred = product(c1, c2).denoiser(x_t[rows], logsnr[rows])
            eps[rows], x0[rows] = pred.eps, pred.x0
        return Prediction(eps=eps, x0=x0, raw=eps, kind="eps")


def null_codes(cond: dict) -> dict:
    return {**cond, "context": torch.full_like(cond["context"], -1)}


def clauses(pairs: list[tuple[int, int]]) -> dict:
    """Each example names x1's component c1 in clause 0 and x2's component c2 in clause 1."""
    ctx = torch.tensor([[[c1, -1], [-1, c2]] for c1, c2 in pairs], dtype=F64)
    return {"context": ctx, "context_mask": torch.ones(len(pairs), 2, 1, dtype=torch.bool),
            "clause_mask": torch.ones(len(pairs), 2, dtype=torch.bool)}


PAIRS = [(0, 0), (0, 1), (1, 0), (1, 1)] * 2


@pytest.mark.parametrize("logsnr", [-8.0, -2.0, 0.0, 3.0, 9.0])
def test_and_of_independent_clauses_is_the_exact_joint_conditional(logsnr):
    x = 1.5 * torch.randn(len(PAIRS), 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    lam = torch.tensor(logsnr, dtype=F64)
    oracle = ClauseOracle()
    pred = ComposedGuidance(oracle, 1.0, null_codes, clauses=2)(x, lam, clauses(PAIRS))
    assert oracle.batches == [3 * len(PAIRS)]  # two clauses and the null in one call
    assert ComposedGuidance(oracle, 1.0, null_codes, clauses=2).rows_per_example == 3
    assert ComposedGuidance(oracle, 0.0, null_codes, clauses=2).rows_per_example == 1  # the null alone
    for i, (c1, c2) in enumerate(PAIRS):
        want = product(c1, c2).denoiser(x[i:i + 1], lam)
        torch.testing.assert_close(pred.eps[i:i + 1], want.eps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pred.x0[i:i + 1], want.x0, rtol=1e-9, atol=1e-9)


def test_and_sampler_runs_the_exact_joint_chain():
    sch = make_schedule("linear", 1000)
    settings = SampleSettings(sampler="ddpm", steps=25, seeds=list(range(8)), batch_size=3)
    cond = clauses(PAIRS)
    x = generate(ComposedGuidance(ClauseOracle(), 1.0, null_codes, clauses=2), sch, (2,), settings,
                 progress=False, dtype=F64, cond=cond)
    joint = ClauseOracle()
    both = {"context": torch.tensor(PAIRS, dtype=F64)}
    torch.testing.assert_close(x, generate(joint, sch, (2,), settings, progress=False, dtype=F64, cond=both),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_formula_masked_clauses_and_one_clause_is_classifier_free_guidance(scale):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    lam = torch.tensor(0.7, dtype=F64)
    cond = clauses(PAIRS[:4])
    cond["clause_mask"][1, 1] = False  # example 1 names x1 only
    pred = ComposedGuidance(ClauseOracle(), scale, null_codes, clauses=2)(x, lam, cond)
    o = ClauseOracle()
    e = [o(x, lam, {"context": cond["context"][:, j]}).eps for j in range(2)]
    e_null = o(x, lam, null_codes({"context": cond["context"][:, 0]})).eps
    w = cond["clause_mask"].to(F64)
    want = e_null + scale * (w[:, :1] * (e[0] - e_null) + w[:, 1:] * (e[1] - e_null))
    torch.testing.assert_close(pred.eps, want, rtol=1e-12, atol=1e-12)
    one = {key: v[:, :1] for key, v in cond.items()}  # a single clause: the ordinary guidance, bit for bit
    got = ComposedGuidance(ClauseOracle(), scale, null_codes, clauses=1)(x, lam, one)
    plain = ClassifierFreeGuidance(ClauseOracle(), scale, null_codes)(x, lam, {"context": cond["context"][:, 0],
                                                                              "context_mask": cond["context_mask"][:, 0]})
    assert torch.equal(got.eps, plain.eps) and torch.equal(got.x0, plain.x0)


def test_shared_keys_reach_every_clause_and_bad_conditions_are_refused():
    seen = []

    def spy(x_t, logsnr, cond=None):
        seen.append(cond["control"].clone())
        return Prediction(eps=torch.zeros_like(x_t), x0=x_t, raw=torch.zeros_like(x_t), kind="eps")

    cond = {**clauses(PAIRS[:3]), "control": torch.tensor([10.0, 20.0, 30.0])}
    ComposedGuidance(spy, 2.0, null_codes, clauses=2)(torch.zeros(3, 2), torch.tensor(0.0), cond)
    assert seen[0].tolist() == [10.0, 20.0, 30.0] * 3  # clause 0, clause 1, null: the control in each
    with pytest.raises(TypeError, match="clause_mask"):
        ComposedGuidance(spy, 2.0, null_codes, clauses=2)(torch.zeros(3, 2), torch.tensor(0.0), {"context": 1})
    with pytest.raises(ValueError, match="2 clauses, the guidance was made for 3"):
        ComposedGuidance(spy, 2.0, null_codes, clauses=3)(torch.zeros(3, 2), torch.tensor(0.0), cond)
    with pytest.raises(ValueError, match="clauses"):
        ComposedGuidance(spy, 2.0, null_codes, clauses=0)


def test_split_clauses_and_errors():
    assert split_clauses("a 3 on the left AND a 7 on the right") == ["a 3 on the left", "a 7 on the right"]
    assert split_clauses("a 3 and a 7") == ["a 3 and a 7"]  # only the upper-case word composes
    assert split_clauses("") == [""]
    assert is_composed(["a 3", "a 5 AND a 6"]) and not is_composed(["a 3", "grand ANDES"])
    assert len(split_clauses(" AND ".join(["a 1"] * 8))) == 8
    for bad in ("a 3 AND ", "AND a 7", "a 3 AND  AND a 7", " AND ", " AND ".join(["a 1"] * 9)):
        with pytest.raises(ValueError, match="empty clause|at most 8"):
            split_clauses(bad)
        with pytest.raises(ConfigError, match="^--prompt: .*(empty clause|at most 8)"):
            check_prompts(["a 1", bad])


class CountingEncoder:
    """A stand-in text encoder: caption -> one token per word, feature = the caption's index in the call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, captions):
        self.calls.append(list(captions))
        length = max(len(c.split()) for c in captions) + 1
        tokens = torch.zeros(len(captions), length, 3)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, c in enumerate(captions):
            tokens[i, :, 0] = i
            mask[i, :len(c.split()) + 1] = True
        return TextFeatures(tokens, mask)


def test_clause_features_pad_with_the_null_caption_and_cycle_prompts():
    enc = CountingEncoder()
    text, null = clause_features(enc, ["a 3 AND a big 7 AND a 1", "a 5"], 5)
    assert enc.calls == [["a 3", "a big 7", "a 1", "a 5", ""]]  # one encoder call, the null last
    assert isinstance(text, ClauseFeatures) and len(text) == 5 and text.clauses == 3
    assert text.tokens[:, :, 0, 0].tolist() == [[0, 1, 2], [3, 4, 4], [0, 1, 2], [3, 4, 4], [0, 1, 2]]
    assert text.present.tolist() == [[True] * 3, [True, False, False]] * 2 + [[True] * 3]
    assert text.mask.shape == (5, 3, text.tokens.shape[2]) and len(null) == 1
    cond = text.as_cond()
    assert set(cond) == {"context", "context_mask", "clause_mask"}
