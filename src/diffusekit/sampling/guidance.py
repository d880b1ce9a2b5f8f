"""Classifier-free guidance: a wrapper that turns a conditional denoiser into a guided one.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", train one network for both p(x | y) and
p(x) by replacing the condition y with a null condition with probability p_uncond during training
(``train.class_dropout``; 0.1-0.2, the values that worked best in their sec. 4), and at sampling time
combine the two noise
predictions made at the same x_t. Their result: the combination samples with a sharper
conditional, trading sample diversity for per-class fidelity (their FID / Inception-score
trade-off) without a separately trained classifier. The one formula used here:

    eps_guided = eps_uncond + s (eps_cond - eps_uncond)

so s = 1 is the plain conditional model, s = 0 the unconditional one and s > 1 guides. (Ho &
Salimans write (1 + w) eps_cond - w eps_uncond: the same formula with s = 1 + w.) Since
score = -eps / sigma (Tweedie), the guided score is grad log p_t(x) + s grad log p_t(y | x): the
unconditional score plus s times the gradient of the implicit classifier p_t(y | x).

The guided ``Prediction`` stays consistent with x_t = alpha x0 + sigma eps: for fixed x_t, x0 =
(x_t - sigma eps) / alpha is affine in eps, so the x0 of eps_guided is the same combination
x0_uncond + s (x0_cond - x0_uncond) (the weights 1 - s and s sum to 1); computing it that way is
exact and never divides by alpha, which vanishes at low SNR. ``raw`` is combined the same way.

One call of the wrapper is ONE network call: the conditional and the null halves are
concatenated into a batch of 2B rows. Samplers and ``generate`` count a call of the wrapper as one
function evaluation (NFE), so guidance leaves the NFE unchanged and doubles the rows each call
evaluates; at s = 1 (s = 0) only the conditional (null) half is evaluated, B rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffusekit.parameterization import DenoiserFn, Prediction

__all__ = ["CLAUSE_KEYS", "ClassifierFreeGuidance", "ComposedGuidance", "guided_eps", "null_class_labels",
           "class_labels_for", "concat_cond"]


def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """eps_uncond + s (eps_cond - eps_uncond) (Ho & Salimans 2022, with s = 1 + w)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def concat_cond(a: Any, b: Any) -> Any:
    """Two conditionings of the same batch stacked along the batch dim: tensors are concatenated,
    dicts key by key (both must have the same keys), None with None stays None."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"conditional and null conditions have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: concat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditions of types {type(a).__name__} and {type(b).__name__}")


def null_class_labels(num_classes: int) -> Callable[[Any], dict]:
    """The null condition for class labels: ``{"class_labels": y, ...}`` -> the same dict (a copy)
    with every label replaced by ``num_classes``, the null label of ``UNet`` and ``MLPDenoiser``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 for a null label, got {num_classes}")

    def null(cond: Any) -> dict:
        if not isinstance(cond, dict) or not isinstance(cond.get("class_labels"), Tensor):
            raise ValueError("class-label guidance needs cond = {'class_labels': tensor of labels}")
        return {**cond, "class_labels": torch.full_like(cond["class_labels"], num_classes)}

    return null


class ClassifierFreeGuidance:
    """``denoiser`` guided with scale ``scale`` toward its condition; a ``DenoiserFn`` itself.

    ``null(cond)`` returns the unconditional condition for the same batch (``null_class_labels(K)``
    for class labels); it must not modify ``cond``, and neither does this wrapper. Works with every
    sampler, since they all call a ``DenoiserFn``; wrap further (counting, clipping) as usual.
    """

    def __init__(self, denoiser: DenoiserFn, scale: float, null: Callable[[Any], Any]):
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"guidance scale must be finite and >= 0, got {scale}")
        self.denoiser, self.scale, self.null = denoiser, float(scale), null

    @property
    def rows_per_example(self) -> int:
        """Network rows evaluated per example in one call: 2 when guiding, 1 at s = 0 or 1."""
        return 1 if self.scale in (0.0, 1.0) else 2

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None) -> Prediction:
        if self.scale == 1.0:
            return self.denoiser(x_t, logsnr, cond)
        null = self.null(cond)
        if self.scale == 0.0:
            return self.denoiser(x_t, logsnr, null)
        b = x_t.shape[0]
        logsnr_2 = torch.cat([logsnr.expand(b), logsnr.expand(b)]) if logsnr.numel() > 1 else logsnr
        both = self.denoiser(torch.cat([x_t, x_t]), logsnr_2, concat_cond(cond, null))
        s = self.scale

        def mix(v: Tensor) -> Tensor:  # conditional rows first, null rows second
            return guided_eps(v[b:], v[:b], s)

        return Prediction(eps=mix(both.eps), x0=mix(both.x0), raw=mix(both.raw), kind=both.kind)


CLAUSE_KEYS = ("context", "context_mask")  # the condition keys that hold one entry per clause in ComposedGuidance


class ComposedGuidance:
    """The AND of several conditions (Liu et al. 2022, "Compositional Visual Generation with Composable
    Diffusion Models", sec. 3-4): ``denoiser`` guided with scale s toward every clause c_k at once,

        eps = eps_null + s * sum_k (eps(x, c_k) - eps_null),

    i.e. the score of p(x) prod_k (p(c_k | x))^s, which treats the clauses as independent given x. At s = 1
    it is p(x | c_1) ... p(x | c_K) / p(x)^(K-1), exact at t = 0 and an approximation at t > 0 (the noised
    product is not the product of the noised factors; Du et al. 2023 sec. 3). With one clause it is
    ``ClassifierFreeGuidance`` itself (bit for bit).

    ``cond`` holds, for the keys of ``CLAUSE_KEYS``, tensors (B, K, ...) (clause k of example b) and
    ``clause_mask`` (B, K) bool: an example with fewer clauses has its padding clauses masked, and they add
    nothing (their entries must still be a valid condition, e.g. the null caption's features). Any other key
    is per example (B, ...) and is given to every clause. ``null(cond)`` takes the per-example form (clause
    0). One call is ONE network call of (K + 1) B rows (B at s = 0).
    """

    def __init__(self, denoiser: DenoiserFn, scale: float, null: Callable[[Any], Any], clauses: int):
        if not (isinstance(clauses, int) and clauses >= 1):
            raise ValueError(f"clauses must be an integer >= 1, got {clauses!r}")
        self.plain = ClassifierFreeGuidance(denoiser, scale, null)
        self.denoiser, self.scale, self.null, self.clauses = denoiser, float(scale), null, clauses

    @property
    def rows_per_example(self) -> int:
        return self.plain.rows_per_example if self.clauses == 1 or self.scale == 0.0 else self.clauses + 1

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None) -> Prediction:
        if not isinstance(cond, dict) or not isinstance(cond.get("clause_mask"), Tensor):
            raise TypeError("composed guidance needs cond with a 'clause_mask' (B, K) and per-clause keys "
                             f"{', '.join(CLAUSE_KEYS)}")
        present = cond["clause_mask"]
        b, k = present.shape
        if k != self.clauses:
            raise ValueError(f"cond has {k} clauses, the guidance was made for {self.clauses}")
        shared = {key: v for key, v in cond.items() if key not in CLAUSE_KEYS and key != "clause_mask"}
        clause = [{**shared, **{key: cond[key][:, j] for key in CLAUSE_KEYS if key in cond}} for j in range(k)]
        if k == 1:
            return self.plain(x_t, logsnr, clause[0])
        null = self.null(clause[0])
        if self.scale == 0.0:
            return self.denoiser(x_t, logsnr, null)
        merged = clause[0]
        for c in [*clause[1:], null]:
            merged = concat_cond(merged, c)
        logsnr_all = torch.cat([logsnr.expand(b)] * (k + 1)) if logsnr.numel() > 1 else logsnr
        out = self.denoiser(torch.cat([x_t] * (k + 1)), logsnr_all, merged)
        s = self.scale

        def mix(v: Tensor) -> Tensor:  # rows: clause 0, ..., clause K-1, null; B each
            v_null = v[k * b:]
            weight = present.to(v.dtype).reshape(b, k, *([1] * (v.ndim - 1)))
            total = sum(weight[:, j] * (v[j * b:(j + 1) * b] - v_null) for j in range(k))
            return v_null + s * total

        return Prediction(eps=mix(out.eps), x0=mix(out.x0), raw=mix(out.raw), kind=out.kind)


def class_labels_for(n: int, classes: Sequence[int] | None, num_classes: int) -> Tensor:
    """Labels of n samples: sample i gets ``classes[i % len(classes)]`` (default 0..K-1, so the
    samples cycle through every class); int64 (n,). Labels outside 0..K-1 are a ValueError."""
    if num_classes < 1:
        raise ValueError(f"class labels need a class-conditional model, got num_classes = {num_classes}")
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must be non-empty (or None for all classes)")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range for a model with {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return torch.tensor(classes, dtype=torch.int64).repeat(-(-n // len(classes)))[:n]
