"""Networks: shapes, zero initialisation, gradient flow, conditioning, ControlNet residuals, errors.

Models are tiny (8 base channels) so the file runs in seconds on 2 CPU cores.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusekit.nn import FourierEmbedding, MLPDenoiser, SinusoidalEmbedding, UNet, make_time_embedding
from diffusekit.nn.unet import Upsample

TINY = dict(base_channels=8, norm_groups=4)
DIGITS = dict(TINY, image_size=8, channel_mult=(1, 2), attn_resolutions=(4,))
MNIST = dict(TINY, image_size=28, channel_mult=(1, 2, 2), attn_resolutions=(7,))


def unet(seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{**DIGITS, **kwargs})


def perturb(model: torch.nn.Module, std: float = 0.2, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised layers stop hiding the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(batch: int = 3, channels: int = 1, size: int = 8, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    logsnr = torch.linspace(-20.0, 20.0, batch)
    return x, logsnr


# ------------------------------------------------------------------------------------ embeddings
def test_sinusoidal_embedding_formula():
    """e = [cos(25 c f_i), sin(25 c f_i)], f_i = 10000^(-i/half); odd dims padded with a zero."""
    c = torch.tensor([-20.0, 0.0, 0.3, 20.0])
    emb = SinusoidalEmbedding(8)(c)
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    args = 25.0 * c[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    odd = SinusoidalEmbedding(7)(c)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


def test_fourier_embedding_buffer_survives_state_dict():
    a, b = FourierEmbedding(16, seed=3), FourierEmbedding(16, seed=4)
    c = torch.randn(5)
    assert "weight" in a.state_dict() and not torch.equal(a(c), b(c))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(c), a(c), rtol=0, atol=0)
    assert torch.equal(FourierEmbedding(16, seed=3).weight, a.weight)  # a pure function of seed
    # inside a network too: a checkpoint carries the random features
    state = unet(time_embedding="fourier").state_dict()
    assert "time_embed.weight" in state


def test_make_time_embedding():
    assert isinstance(make_time_embedding("sinusoidal", 8), SinusoidalEmbedding)
    assert isinstance(make_time_embedding("fourier", 8), FourierEmbedding)
    with pytest.raises(ValueError, match="fourier"):
        make_time_embedding("learned", 8)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ U-Net shapes
@pytest.mark.parametrize(
    "config,channels,size",
    [
        (dict(DIGITS), 1, 8),
        (dict(DIGITS, attn_resolutions=(), mid_attention=False, time_embedding="fourier"), 3, 8),
        (dict(DIGITS, attn_resolutions=(8, 4), num_heads=2, num_res_blocks=2), 1, 8),
        (dict(MNIST), 1, 28),
        (dict(MNIST, attn_resolutions=(), time_embedding="fourier"), 3, 28),
    ],
)
def test_unet_output_shape_and_zero_init(config, channels, size):
    torch.manual_seed(0)
    model = UNet(in_channels=channels, **config)
    x, logsnr = inputs(2, channels, size)
    out = model(x, logsnr)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output conv: exactly zero at initialisation
    assert perturb(model)(x, logsnr).abs().sum() > 0


def test_unet_out_channels_and_scalar_noise_level():
    model = unet(in_channels=3, out_channels=6)
    x, _ = inputs(2, 3)
    assert model(x, torch.tensor(1.5)).shape == (2, 6, 8, 8)  # a 0-d c_noise is broadcast
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        model(x, torch.zeros(2, 1))


def test_unet_float64():
    model = perturb(unet().double())
    x, logsnr = inputs()
    assert model(x.double(), logsnr.double()).dtype == torch.float64


def test_upsample_equals_nearest_then_conv():
    """The transposed-conv form is exactly conv3x3(nearest2x(x)) (DDPM's upsampling)."""
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    up = up.double()
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), ref, rtol=1e-12, atol=1e-12)


def test_unet_deterministic_construction():
    a, b = unet(0, time_embedding="fourier"), unet(0, time_embedding="fourier")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ gradients
def test_gradient_reaches_every_parameter():
    model = perturb(unet(num_classes=3, context_dim=5, num_heads=2))
    x, logsnr = inputs()
    labels = torch.tensor([0, 1, 3])
    context = torch.randn(3, 4, 5)
    model(x, logsnr, class_labels=labels, context=context).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_gradient_at_initialisation_reaches_output_conv():
    model = unet()
    x, logsnr = inputs()
    (model(x, logsnr) - x).square().mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    model = perturb(unet(dropout=0.5))
    x, logsnr = inputs()
    assert not torch.equal(model(x, logsnr), model(x, logsnr))
    model.eval()
    assert torch.equal(model(x, logsnr), model(x, logsnr))


# ------------------------------------------------------------------------------------ conditioning
def test_class_labels_change_output_and_none_is_null():
    model = perturb(unet(num_classes=4))
    x, logsnr = inputs()
    a = model(x, logsnr, class_labels=torch.tensor([0, 0, 0]))
    b = model(x, logsnr, class_labels=torch.tensor([1, 2, 3]))
    assert not torch.allclose(a, b)
    null = model(x, logsnr, class_labels=torch.full((3,), 4))
    torch.testing.assert_close(model(x, logsnr), null, rtol=0, atol=0)


def test_class_labels_errors():
    x, logsnr = inputs()
    with pytest.raises(ValueError, match="num_classes=0"):
        unet()(x, logsnr, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels"):
        unet(num_classes=2)(x, logsnr, class_labels=torch.zeros(3))  # float labels


def test_cross_attention_context():
    model = perturb(unet(context_dim=6))
    x, logsnr = inputs()
    gen = torch.Generator().manual_seed(5)
    c1, c2 = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 2, 6, generator=gen)
    a, b = model(x, logsnr, context=c1), model(x, logsnr, context=c2)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, model(x, logsnr))  # no context: cross-attention is skipped
    with pytest.raises(ValueError, match=r"context must have shape \(3, L, 6\)"):
        model(x, logsnr, context=torch.randn(3, 4, 5))


def test_context_without_context_dim_raises():
    x, logsnr = inputs()
    with pytest.raises(ValueError, match="context_dim=None"):
        unet()(x, logsnr, context=torch.randn(3, 4, 6))


# ------------------------------------------------------------------------------------ residuals
def test_residual_shapes_match_the_encoder():
    model = unet(**MNIST)
    # conv_in, res(28), down(14), res(14), down(7), res(7), then the middle
    assert model.residual_shapes(2) == [
        (2, 8, 28, 28), (2, 8, 28, 28), (2, 8, 14, 14), (2, 16, 14, 14),
        (2, 16, 7, 7), (2, 16, 7, 7), (2, 16, 7, 7),
    ]  # fmt: skip
    assert model.residual_shapes(1, (56, 28))[0] == (1, 8, 56, 28)


def test_residuals_zero_equal_none_nonzero_change_and_list_untouched():
    model = perturb(unet(**MNIST))
    x, logsnr = inputs(2, 1, 28)
    base = model(x, logsnr)
    zeros = [torch.zeros(s) for s in model.residual_shapes(2)]
    torch.testing.assert_close(model(x, logsnr, residuals=zeros), base, rtol=0, atol=0)

    gen = torch.Generator().manual_seed(7)
    residuals = [torch.randn(s, generator=gen) for s in model.residual_shapes(2)]
    copies = [r.clone() for r in residuals]
    ids = [id(r) for r in residuals]
    out = model(x, logsnr, residuals=residuals)
    assert not torch.allclose(out, base)
    assert [id(r) for r in residuals] == ids and len(residuals) == len(copies)
    assert all(torch.equal(r, c) for r, c in zip(residuals, copies))
    # only the middle residual: it alone still changes the output
    mid_only = zeros[:-1] + [residuals[-1]]
    assert not torch.allclose(model(x, logsnr, residuals=mid_only), base)


def test_residuals_wrong_count_or_shape_raise():
    model = unet()
    x, logsnr = inputs()
    shapes = model.residual_shapes(3)
    good = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=f"expected {len(shapes)} residuals"):
        model(x, logsnr, residuals=good[:-1])
    bad = list(good)
    bad[1] = torch.zeros(3, 99, 8, 8)
    with pytest.raises(ValueError, match=r"residuals\[1\].*\(3, 8, 8, 8\)"):
        model(x, logsnr, residuals=bad)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 2, 8, 8), (3, 1, 7, 8), (3, 1, 9, 9)])
def test_bad_input_shape_names_expected_shape(shape):
    model = unet()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*divisible by 2.*\(B, 1, 8, 8\)") as info:
        model(torch.zeros(shape), torch.zeros(shape[0]))
    assert "\n" not in str(info.value)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(image_size=8, attn_resolutions=(7,))
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(**TINY, num_heads=3)


def test_other_input_sizes_work():
    """The network is convolutional: any H, W divisible by 2**(levels-1) is accepted."""
    model = unet()
    x = torch.randn(2, 1, 12, 16)
    assert model(x, torch.zeros(2)).shape == x.shape


# ------------------------------------------------------------------------------------ MLP
@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_mlp_shape_zero_init_and_gradients(kind):
    torch.manual_seed(0)
    model = MLPDenoiser(dim=3, hidden=32, depth=2, time_embedding=kind, emb_dim=16, num_classes=2)
    x, logsnr = torch.randn(5, 3), torch.linspace(-10, 10, 5)
    out = model(x, logsnr)
    assert out.shape == x.shape and torch.all(out == 0)
    perturb(model)
    model(x, logsnr, class_labels=torch.tensor([0, 1, 2, 0, 1])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mlp_class_labels_and_errors():
    torch.manual_seed(0)
    model = perturb(MLPDenoiser(hidden=32, depth=2, num_classes=3))
    x, logsnr = torch.randn(4, 2), torch.zeros(4)
    a = model(x, logsnr, class_labels=torch.tensor([0, 0, 0, 0]))
    b = model(x, logsnr, class_labels=torch.tensor([1, 1, 2, 2]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, logsnr), model(x, logsnr, class_labels=torch.full((4,), 3)))
    with pytest.raises(ValueError, match="context"):
        model(x, logsnr, context=torch.zeros(4, 1, 2))
    with pytest.raises(ValueError, match="residuals"):
        model(x, logsnr, residuals=[torch.zeros(4, 2)])
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.zeros(4, 3), logsnr)
    with pytest.raises(ValueError, match="num_classes=0"):
        MLPDenoiser()(x, logsnr, class_labels=torch.zeros(4, dtype=torch.long))


def test_noise_level_changes_output():
    """The same x at two noise levels gives two outputs (the embedding is wired in)."""
    model = perturb(unet())
    x, _ = inputs()
    assert not torch.allclose(model(x, torch.full((3,), -5.0)), model(x, torch.full((3,), 5.0)))
    mlp = perturb(MLPDenoiser(hidden=16, depth=1))
    assert not math.isclose(
        mlp(torch.zeros(1, 2), torch.tensor([-5.0])).sum().item(),
        mlp(torch.zeros(1, 2), torch.tensor([5.0])).sum().item(),
    )
