"""Regressor and DIRNet: every paper variant's shapes, identity start, input checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirnet_jax import PAPER_VARIANTS, DIRNetConfig, apply, init_variables, layers, models, variant
from dirnet_jax.batchnorm import BatchNorm
from dirnet_jax.config import TRANSFORMERS
from dirnet_jax.models import Regressor, fold_batchnorm, pairs_per_pass, register, register_batched

MNIST = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2)
CARDIAC = DIRNetConfig()  # 256×256, four downsamplings
VOLUME = DIRNetConfig(image_shape=(8, 8, 8), num_downsamplings=1)  # 3-D: [B, D, H, W, C]


def compiled(fn, *args, **kwargs):
    """fn(*args, **kwargs) as one compiled program (fn's non-array arguments bound): op by
    op, each of a network's ~100 operations compiles alone (~3-5 s of such a test)."""
    return jax.jit(functools.partial(fn, **kwargs))(*args)


@pytest.mark.parametrize("name", list(PAPER_VARIANTS))
@pytest.mark.parametrize("base,grid", [(MNIST, (7, 7)), (CARDIAC, (16, 16)), (VOLUME, (4, 4, 4))])
def test_every_variant_shapes_and_identity_start(rng, name, base, grid):
    config = variant(name, base)
    assert config.grid_shape == grid
    variables = init_variables(config, jax.random.key(0))
    x = jnp.asarray(rng.uniform(size=(2, *config.image_shape, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, *config.image_shape, 1)), jnp.float32)
    # Compiled whole (op by op, the 14 cases took 84 s here against 70).
    reg, stats = jax.jit(functools.partial(apply, config, train=True))(variables, x, y)
    assert reg.grid.shape == (2, *grid, len(grid))
    assert reg.displacement.shape == (2, *config.image_shape, len(grid))
    assert reg.warped.shape == y.shape
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    # An untrained DIRNet is (nearly) the identity.
    assert float(jnp.abs(reg.displacement).max()) < 0.05
    np.testing.assert_allclose(reg.warped, y, atol=0.05)


def test_every_transformer_name_has_its_function():
    # config names them without importing JAX; models maps each name to its function.
    assert set(models.TRANSFORM_FNS) == set(TRANSFORMERS)


def test_variants_are_data():
    assert variant("A2", MNIST).downsampling == "strided"
    assert variant("B2", MNIST).transformer == "tps"
    assert variant("C1", MNIST).receptive_field == "overlap"
    assert variant("baseline", MNIST) == MNIST
    with pytest.raises(ValueError, match="unknown variant"):
        variant("D1")


def count_params(config):
    return sum(x.size for x in jax.tree.leaves(init_variables(config, jax.random.key(0))["params"]))


def test_architecture_differences():
    base = count_params(MNIST)
    # C1 adds two 3×3 convs of 16→16 (2·144·16 weights) with their BatchNorm scales and biases.
    assert count_params(variant("C1", MNIST)) - base == 2 * (9 * 16 * 16 + 2 * 16)
    # A2 adds a 2×2 strided conv + BatchNorm per downsampling.
    assert count_params(variant("A2", MNIST)) - base == 2 * (4 * 16 * 16 + 2 * 16)
    assert count_params(variant("A1", MNIST)) == base  # max pooling has no parameters
    # The paper's MNIST net keeps four 3×3 convs and drops two downsamplings.
    four = MNIST.replace(conv_layers=4)
    assert four.grid_shape == (7, 7)
    assert count_params(four) - base == 2 * (9 * 16 * 16 + 2 * 16)
    assert count_params(variant("C1", four)) - count_params(four) == 2 * (9 * 16 * 16 + 2 * 16)
    with pytest.raises(ValueError, match="every downsampling follows a conv"):
        MNIST.replace(conv_layers=1)
    # C2: dense 7·7·16 → 1024 → 1024 → 7·7·2.
    c2 = variant("C2", MNIST)
    params = init_variables(c2, jax.random.key(0))["params"]
    shapes = sorted(p.shape for p in jax.tree.leaves(params) if p.ndim == 2)
    assert shapes == sorted([(7 * 7 * 16, 1024), (1024, 1024), (1024, 7 * 7 * 2)])


def test_zero_output_layer_is_exactly_the_identity(rng):
    config = MNIST
    variables = init_variables(config, jax.random.key(0))
    variables["params"]["output"] = jax.tree.map(jnp.zeros_like, variables["params"]["output"])
    x = jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32)
    reg = register(config, variables, x, y)
    assert np.all(np.asarray(reg.displacement) == 0)
    assert np.array_equal(np.asarray(reg.warped), np.asarray(y))


def test_fully_convolutional_variants_take_other_sizes(rng):
    variables = init_variables(MNIST, jax.random.key(0))
    x = jnp.zeros((1, 32, 36, 1))
    reg = register(MNIST, variables, x, x)
    assert reg.grid.shape == (1, 8, 9, 2)
    assert reg.displacement.shape == (1, 32, 36, 2)


@pytest.mark.parametrize(
    "config,shape,message",
    [
        (MNIST, ((1, 28, 28, 1), (1, 28, 24, 1)), "differ in shape"),
        (MNIST, ((1, 28, 28, 3), (1, 28, 28, 3)), "given to a model for"),
        (MNIST, ((1, 28, 28, 4, 1), (1, 28, 28, 4, 1)), "given to a model for"),
        (MNIST, ((1, 30, 30, 1), (1, 30, 30, 1)), "not a multiple of the downsampling factor 4"),
        (variant("C2", MNIST), ((1, 32, 32, 1), (1, 32, 32, 1)), "only takes its training size"),
    ],
)
def test_bad_pairs_raise_one_line(config, shape, message):
    variables = init_variables(config, jax.random.key(0))
    with pytest.raises(ValueError, match=message) as err:
        register(config, variables, jnp.zeros(shape[0]), jnp.zeros(shape[1]))
    assert "\n" not in str(err.value)


def test_config_validation():
    with pytest.raises(ValueError, match="downsampling='median'"):
        DIRNetConfig(downsampling="median")
    with pytest.raises(ValueError, match="not divisible"):
        DIRNetConfig(image_shape=(28, 28), num_downsamplings=3)
    with pytest.raises(ValueError, match="num_downsamplings"):
        DIRNetConfig(num_downsamplings=0)
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        DIRNetConfig(compute_dtype="float16")
    for rate in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match="learning_rate must be finite and ≥ 0"):
            DIRNetConfig(learning_rate=rate)
    assert DIRNetConfig(learning_rate=0.0).learning_rate == 0  # a run that only evaluates
    for weight in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="regularizer_weight must be finite and ≥ 0"):
            DIRNetConfig(regularizer_weight=weight)
    for momentum in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match=r"bn_momentum must be in \[0, 1\]"):
            DIRNetConfig(bn_momentum=momentum)
    for name in ("max_checkpoints", "num_val_pairs", "dense_features"):
        with pytest.raises(ValueError, match=f"{name} must be ≥ 1, got 0"):
            DIRNetConfig(**{name: 0})


def test_register_traces_once_per_shape(rng):
    config = MNIST.replace(features=8)
    variables = init_variables(config, jax.random.key(0))
    before = register._cache_size()
    for _ in range(3):
        x = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
        register(config, variables, x, x)
    assert register._cache_size() == before + 1
    register(config, variables, jnp.zeros((2, 28, 28, 1)), jnp.zeros((2, 28, 28, 1)))
    assert register._cache_size() == before + 2


def test_register_batched_equals_one_batch(rng):
    config = MNIST.replace(features=8)
    variables = init_variables(config, jax.random.key(1))
    # A random non-zero output layer, so the registration is not the identity.
    head = variables["params"]["output"]["kernel"]
    variables["params"]["output"]["kernel"] = jnp.asarray(rng.normal(size=head.shape), head.dtype)
    fixed, moving = (rng.uniform(size=(7, 28, 28, 1)).astype(np.float32) for _ in range(2))
    whole = register(config, variables, fixed, moving)
    chunked = register_batched(config, variables, fixed, moving, batch_size=3)  # 3 + 3 + 1
    assert isinstance(chunked.warped, np.ndarray) and chunked.warped.shape == (7, 28, 28, 1)
    assert np.abs(np.asarray(whole.displacement)).max() > 0.1
    np.testing.assert_allclose(chunked.warped, whole.warped, atol=1e-5)
    np.testing.assert_allclose(chunked.displacement, whole.displacement, atol=1e-5)


def perturbed(config, seed=0):
    """Variables whose every BatchNorm statistic, scale and bias and whose output layer are
    random, so that no part of the network is an identity."""
    variables = init_variables(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if "output" in name or "mean" in name or "bias" in name:
            return jnp.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("name", list(PAPER_VARIANTS))
def test_folded_batchnorm_gives_the_same_grid(rng, name):
    config = variant(name, MNIST.replace(features=8, dense_features=32))
    variables = perturbed(config)
    fixed, moving = (rng.uniform(size=(3, 28, 28, 1)).astype(np.float32) for _ in range(2))
    plain = compiled(Regressor(config).apply, variables, fixed, moving, train=False)
    folded_vars = fold_batchnorm(variables)
    assert not any(k.startswith("BatchNorm") for k in folded_vars["params"])
    folded = compiled(Regressor(config, folded=True).apply, folded_vars, fixed, moving,
                      train=False)  # fmt: skip
    assert float(jnp.abs(plain).max()) > 0.1
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inference mode"):
        Regressor(config, folded=True).apply(folded_vars, fixed, moving, train=True)
    del variables["params"]["BatchNorm_0"]
    with pytest.raises(ValueError, match="BatchNorms: not a DIRNet regressor"):
        fold_batchnorm(variables)


@pytest.mark.parametrize("name", ["baseline", "A2", "B2", "C2"])
def test_volumes_register_as_the_unfolded_regressor(rng, name):
    # 3-D end to end: `register` (BatchNorm folded, the first layer fused, passes on a CPU)
    # against the regressor as it is trained, in inference mode, and the spline and warp;
    # the variants whose inference takes another path (A2's first conv by taps, its strided
    # convs; B2's thin-plate matrix; C2's dense head). All seven train in 3-D above.
    config = variant(name, VOLUME.replace(features=8, dense_features=32))
    variables = perturbed(config)
    fixed, moving = (jnp.asarray(rng.uniform(size=(3, 8, 8, 8, 1)), jnp.float32) for _ in "fm")
    reg = register(config, variables, fixed, moving)
    assert reg.grid.shape == (3, 4, 4, 4, 3) and reg.displacement.shape == (3, 8, 8, 8, 3)
    grid = compiled(Regressor(config).apply, variables, fixed, moving, train=False)
    assert float(jnp.abs(grid).max()) > 0.1
    np.testing.assert_allclose(reg.grid, grid, rtol=1e-5, atol=1e-5)
    expected = compiled(functools.partial(models.transform, config), grid, moving)
    np.testing.assert_allclose(reg.displacement, expected.displacement, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reg.warped, expected.warped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["baseline", "A2", "C2"])
def test_training_computes_the_first_conv_by_taps(rng, name, monkeypatch):
    # One convolution fewer in the training network than at inference without folding,
    # and the same function of the same variables as with flax's conv first.
    config = variant(name, MNIST.replace(features=8, dense_features=32))
    variables = perturbed(config)
    fixed, moving = (jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32) for _ in "ab")

    def run(variables, train=True):  # traced anew at each call: after the monkeypatch too
        apply = Regressor(config).apply
        return compiled(apply, variables, fixed, moving, train=train, mutable=True)

    def convolutions(train):
        text = jax.jit(functools.partial(run, train=train)).lower(variables).as_text()
        return text.count("stablehlo.convolution")

    assert convolutions(train=True) == convolutions(train=False) - 1
    grid, stats = run(variables)
    flax_conv = lambda features, conv=None, **kw: nn.Conv(features, (3, 3), **kw)  # noqa: E731
    monkeypatch.setattr(layers, "TapConv", flax_conv)
    expected_grid, expected_stats = run(variables)
    np.testing.assert_allclose(grid, expected_grid, rtol=1e-4, atol=1e-5)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), stats, expected_stats
    )


@pytest.mark.parametrize(
    "name,passes", [("baseline", 0), ("A1", 0), ("C1", 0), ("A2", 0), ("baseline", 3)]
)
def test_first_layer_at_once_trains_alike(rng, name, passes, monkeypatch):
    # `first_layer_train` (training's first layer on GPUs, `train_first_layer_conv`; here
    # on the CPU too): the same loss, gradients and batch statistics as layer by layer. A2
    # (strided conv) keeps the layers apart. `passes`: TRAIN_FIRST_LAYER_PASSES, how its
    # kernels compute on CUDA (off CUDA XLA's path takes no notice). At 32²: the models
    # take the layer at once where first_layer_grad's kernels take its shape.
    side = 32
    config = variant(name, MNIST.replace(features=8, image_shape=(side, side)))
    variables = perturbed(config)
    fixed, moving = (jnp.asarray(rng.uniform(size=(4, side, side, 1)), jnp.float32) for _ in "ab")

    def loss(params):
        grid, stats = Regressor(config).apply(
            {**variables, "params": params}, fixed, moving, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(grid)), stats

    def run():
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    monkeypatch.setattr(models, "train_first_layer_conv", None)
    (expected, expected_stats), expected_grads = run()
    monkeypatch.setattr(models, "TRAIN_FIRST_LAYER_PLATFORMS", (models.default_platform(),))
    monkeypatch.setattr(models, "train_first_layer_conv", layers.conv_taps)
    monkeypatch.setattr(models, "TRAIN_FIRST_LAYER_PASSES", passes)
    (got, stats), grads = run()
    traced = str(jax.make_jaxpr(loss)(variables["params"]))
    assert ("first_layer_train" in traced) == (name != "A2")
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    want = jax.tree.leaves((expected_grads, expected_stats))
    for a, b in zip(jax.tree.leaves((grads, stats)), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
    assert float(jnp.abs(grads["Conv_0"]["kernel"]).max()) > 0


@pytest.mark.parametrize(
    "backend,dtype,train_conv,side,at_once",
    [("gpu", "float32", "", 32, True), ("cpu", "float32", "", 32, False),
     ("gpu", "bfloat16", "", 32, False), ("gpu", "float32", "xla", 32, False),
     ("gpu", "float32", "", 28, False)],
)  # fmt: skip
def test_training_takes_the_first_layer_at_once_on_gpus_in_float32(
    monkeypatch, backend, dtype, train_conv, side, at_once
):
    # The first layer at once was timed on an H200 in float32 with its kernels (faster),
    # and on a CPU and with XLA's gradients (slower): the step is traced for the backend
    # jax runs on, at shapes the kernels take (not 28²: half width 14); DIRNET_TRAIN_CONV=xla
    # turns it off with the other training kernels.
    config = DIRNetConfig(image_shape=(side, side), num_downsamplings=2, features=16,
                          compute_dtype=dtype)  # fmt: skip
    variables = init_variables(config, jax.random.key(0))
    x = jnp.zeros((2, side, side, 1))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setenv("DIRNET_TRAIN_CONV", train_conv)

    def run(v):
        return Regressor(config).apply(v, x, x, train=True, mutable=["batch_stats"])

    assert ("first_layer_train" in str(jax.make_jaxpr(run)(variables))) == at_once


def test_batchnorm_applied_by_its_layer_only_trains():
    bn = BatchNorm(use_running_average=True)
    variables = bn.init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="training only"):
        bn.apply(variables, jnp.ones((2, 3)), layer=(lambda x, s, b: (x, s, b), 4))


@pytest.mark.parametrize("name", ["baseline", "A2", "C1"])
def test_folded_inference_computes_the_first_conv_without_a_convolution(rng, name):
    # One convolution fewer in the compiled inference network: the first is an elementwise
    # loop, together with its pooling (`conv_elu_pool2`) or, where a strided conv
    # downsamples (A2), alone (`conv_taps`).
    config = variant(name, MNIST.replace(features=8))
    variables = perturbed(config)
    x = jnp.zeros((1, 28, 28, 1))

    def convolutions(module, variables):
        text = jax.jit(lambda v: module.apply(v, x, x, train=False)).lower(variables).as_text()
        return text.count("stablehlo.convolution")

    plain = convolutions(Regressor(config), variables)
    fast = convolutions(Regressor(config, folded=True), fold_batchnorm(variables))
    assert fast == plain - 1


@pytest.mark.parametrize("name", ["baseline", "A2", "C2"])
def test_bfloat16_activations_register_within_bfloat16_precision(rng, name):
    config = variant(name, MNIST.replace(features=8, dense_features=32))
    variables = perturbed(config)
    fixed, moving = (rng.uniform(size=(3, 28, 28, 1)).astype(np.float32) for _ in range(2))
    full = compiled(functools.partial(apply, config), variables, fixed, moving)[0]
    half = config.replace(compute_dtype="bfloat16")
    half = compiled(functools.partial(apply, half), variables, fixed, moving)[0]
    assert all(a.dtype == jnp.float32 for a in half)  # spline and warp in float32
    scale = float(jnp.abs(full.grid).max())
    error = float(jnp.abs(half.grid - full.grid).max())
    assert scale > 0.1 and 1e-5 * scale < error < 0.05 * scale  # bfloat16, and close
    np.testing.assert_allclose(half.warped, full.warped, atol=0.05)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_register_in_chunks_equals_one_pass(rng, chunk):
    config = MNIST.replace(features=8)
    variables = perturbed(config)
    fixed, moving = (rng.uniform(size=(7, 28, 28, 1)).astype(np.float32) for _ in range(2))
    whole = compiled(functools.partial(apply, config), variables, fixed, moving)[0]
    assert float(jnp.abs(whole.displacement).max()) > 0.1
    chunked = register(config, variables, fixed, moving, chunk=chunk)  # 3 + 3 + 1 for 3
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="chunk must be a positive number of pairs, got 0"):
        register(config, variables, fixed, moving, chunk=0)


def test_registrar_registers_as_register_and_traces_once(rng):
    config = MNIST.replace(features=8)
    variables = perturbed(config)
    bound = models.registrar(config, variables)
    before = models._register_folded._cache_size()
    for n in (7, 7, 1):
        fixed, moving = (rng.uniform(size=(n, 28, 28, 1)).astype(np.float32) for _ in "ab")
        expected = register(config, variables, fixed, moving)
        assert float(jnp.abs(expected.displacement).max()) > 0.1
        for chunk in (None, 3):
            got = bound(fixed, moving, chunk=chunk)
            for name, a, b in zip(expected._fields, got, expected, strict=True):
                # The warp multiplies the field's rounding (1e-6 px) by the image's steps
                # between neighbours (up to 1 in these noise images).
                atol = 3e-6 if name == "warped" else 1e-6
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol, err_msg=name)
    # One trace per shape and chunk: (7, None), (7, 3), (1, None), (1, 3).
    assert models._register_folded._cache_size() == before + 4
    with pytest.raises(ValueError, match="differ in shape"):
        bound(jnp.zeros((1, 28, 28, 1)), jnp.zeros((2, 28, 28, 1)))


def test_pairs_per_pass_keeps_a_pass_in_cache_on_cpu():
    assert jax.default_backend() == "cpu"
    assert pairs_per_pass(CARDIAC, 32) == 2  # 256² pairs: two per pass
    assert pairs_per_pass(CARDIAC, 1) == 1
    assert pairs_per_pass(MNIST, 32) == 32  # 28² pairs: the whole batch


def test_regressor_sees_the_pair_in_order():
    # Swapping fixed and moving changes the prediction: the concatenation order matters.
    config = MNIST.replace(features=4)
    variables = init_variables(config, jax.random.key(0))
    a = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 28, 28, 1)), jnp.float32)
    b = jnp.roll(a, 3, axis=1)
    r = jax.jit(functools.partial(Regressor(config).apply, train=False))
    assert not np.allclose(r(variables, a, b), r(variables, b, a))


def test_init_variables_is_flax_init_compiled_once_per_network():
    key = jax.random.key(3)
    dummy = jnp.zeros((1, *MNIST.image_shape, 1), jnp.float32)
    want = dict(Regressor(MNIST).init(key, dummy, dummy, train=False))  # flax's, op by op
    got = init_variables(MNIST, key)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)  # fused: an ulp at most
    compiled = models._init_variables._cache_size()
    init_variables(MNIST.replace(seed=5, num_steps=7, batch_size=3), key)  # run fields
    assert models._init_variables._cache_size() == compiled
