"""model: shapes, receptive field, causality, configuration round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the model is a Keras/TensorFlow model")
keras = pytest.importorskip("keras")

from image_classifier.model import (  # noqa: E402
    ModelConfig,
    Pooling,
    build_model,
    count_flops,
    flops_by_part,
    init_whitening,
    parameters_by_part,
    receptive_field,
    sequence_length,
    tcn_stack,
    token_grid_side,
    validate_config,
    whitening_kernel,
)

SMALL = ModelConfig(stem_filters=(8, 16), tcn_filters=16, dropout=0.1)
WHITENED = ModelConfig(
    stem_filters=(8, 16), whiten_patch=2, token_pool=2, tcn_filters=16, dilations=(1, 2)
)


def _stack_model(config: ModelConfig, steps: int, channels: int = 4) -> keras.Model:
    inputs = keras.Input((steps, channels))
    return keras.Model(inputs, tcn_stack(inputs, config))


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        ModelConfig(stem_filters=(), layout="rows", tcn_filters=8, dilations=(1, 2, 4, 8)),
        ModelConfig(
            stem_filters=(8,), tcn_filters=8, dilations=(1, 2, 4, 8, 16, 32, 64), norm="layer"
        ),
    ],
    ids=["stem-raster", "pixel-rows", "one-stage-layernorm"],
)
def test_output_shape_and_default_receptive_field_covers_sequence(config: ModelConfig) -> None:
    model = build_model(config)
    logits = model(np.random.rand(3, 32, 32, 3).astype("float32"), training=False)
    assert tuple(logits.shape) == (3, 10)
    assert receptive_field(config) >= sequence_length(config)


def test_shipped_default_sequence_and_receptive_field() -> None:
    config = ModelConfig()
    assert sequence_length(config) == 64  # 8x8 stem grid in raster order
    assert receptive_field(config) == 1 + 2 * 2 * (1 + 2 + 4 + 8 + 16) == 125


def test_config_whose_receptive_field_misses_the_start_is_refused() -> None:
    short = ModelConfig(stem_filters=(), layout="raster", dilations=(1, 2, 4))
    with pytest.raises(ValueError, match="receptive field"):
        validate_config(short)


def test_receptive_field_formula_matches_the_network() -> None:
    """Perturb each input step: the last output moves iff the step is inside the field."""
    config = ModelConfig(tcn_filters=8, dilations=(1, 2), dropout=0.0)
    rf = receptive_field(config)  # 1 + 2*2*3 = 13
    steps = 24
    model = _stack_model(config, steps)
    base = np.random.default_rng(0).normal(size=(1, steps, 4)).astype("float32")
    reference = model(base, training=False).numpy()[0, -1]
    reached = []
    for t in range(steps):
        changed = base.copy()
        changed[0, t] += 5.0
        reached.append(not np.allclose(model(changed, training=False).numpy()[0, -1], reference))
    first_reached = reached.index(True)
    assert first_reached == steps - rf
    assert all(reached[first_reached:])


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_tcn_stack_is_causal(norm: str) -> None:
    """Changing step t never changes outputs at steps < t."""
    config = ModelConfig(tcn_filters=8, dilations=(1, 2, 4, 8), norm=norm, dropout=0.0)
    steps = 32
    model = _stack_model(config, steps)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2, steps, 4)).astype("float32")
    out = model(base, training=False).numpy()
    for t in (0, 5, 17, 31):
        changed = base.copy()
        changed[:, t:] = rng.normal(size=changed[:, t:].shape)
        new = model(changed, training=False).numpy()
        np.testing.assert_allclose(new[:, :t], out[:, :t], atol=1e-6)
        assert not np.allclose(new[:, t], out[:, t])


def test_model_standardizes_its_input() -> None:
    config = ModelConfig(
        stem_filters=(8, 16), tcn_filters=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    model = build_model(config)
    standardize = model.get_layer("standardize")
    out = standardize(np.full((1, 32, 32, 3), 0.75, "float32")).numpy()
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_config_round_trips_through_json_dict() -> None:
    import json

    restored = ModelConfig.from_dict(json.loads(SMALL.to_json()))
    assert restored == SMALL
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"filters": 3})


def test_flops_count_matches_hand_count() -> None:
    config = ModelConfig(
        stem_filters=(8,),
        stem_convs_per_stage=1,
        tcn_filters=8,
        dilations=(1, 2, 4, 8, 16, 32, 64, 128),
        convs_per_block=1,
    )
    model = build_model(config)
    stem_in = 32 * 32 * 9 * 3 * 4  # 3 -> 4 channels at 32x32
    stage = 32 * 32 * 9 * 4 * 8  # conv at full resolution, then pooled
    tcn = 8 * 256 * 3 * 8 * 8  # eight blocks, one conv each, 256 steps
    head = 8 * 10
    assert count_flops(model) == 2 * (stem_in + stage + tcn + head)
    assert flops_by_part(model) == {
        "stem": 2 * (stem_in + stage),
        "tcn": 2 * tcn,
        "classifier": 2 * head,
    }


def test_the_parts_add_up_and_the_tcn_holds_most_of_the_shipped_recipes_parameters() -> None:
    import json
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "cifar10_tcn.json"
    config = ModelConfig.from_dict(json.loads(recipe.read_text())["model"])
    model = build_model(config)
    parameters = parameters_by_part(model)
    assert sum(parameters.values()) == model.count_params()
    assert parameters["tcn"] > model.count_params() / 2  # the floor for "still a TCN"
    assert sum(flops_by_part(model).values()) == count_flops(model)


def test_the_ablation_without_the_tcn_pools_the_stems_tokens() -> None:
    config = ModelConfig(stem_filters=(8, 16), tcn_filters=16, tcn=False)
    model = build_model(config)
    assert not [layer for layer in model.layers if layer.name.startswith("tcn")]
    assert parameters_by_part(model)["tcn"] == flops_by_part(model)["tcn"] == 0
    assert model(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="needs a stem"):
        build_model(ModelConfig(stem_filters=(), tcn=False))


@pytest.mark.parametrize(
    ("readout", "reduce"),
    [
        ("last", lambda steps: steps[:, -1]),
        ("mean", lambda steps: steps.mean(axis=1)),
        ("max", lambda steps: steps.max(axis=1)),
    ],
)
def test_the_classifier_reads_the_tcns_output_steps_as_configured(
    readout: str, reduce: Callable[[np.ndarray], np.ndarray]
) -> None:
    config = ModelConfig(
        stem_filters=(8, 16),
        whiten_patch=2,
        token_pool=2,
        tcn_filters=16,
        dilations=(1, 2),
        readout=readout,
    )
    model = build_model(config)
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    last_block = [layer for layer in model.layers if layer.name.startswith("tcn")][-1]
    steps = keras.Model(model.input, last_block.output)(images).numpy()
    features = reduce(steps)
    logits_layer = model.get_layer("logits")
    kernel, bias = (w.numpy() for w in logits_layer.weights)
    np.testing.assert_allclose(model(images), features @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_without_the_tcn_the_max_readout_max_pools_the_tokens() -> None:
    """Airbench's head: a global max over the last grid, then the classifier."""
    config = ModelConfig(stem_filters=(8, 16), whiten_patch=2, tcn=False, readout="max")
    model = build_model(config)
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    tokens = keras.Model(model.input, model.get_layer("to_sequence").output)(images).numpy()
    kernel, bias = (w.numpy() for w in model.get_layer("logits").weights)
    expected = tokens.max(axis=1) @ kernel + bias
    np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(tokens.max(axis=1), tokens.mean(axis=1))  # the two differ here


def test_gelu_replaces_every_relu_and_computes_the_exact_gelu() -> None:
    config = dataclasses.replace(WHITENED, activation="gelu")
    model = build_model(config)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    activations = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert all("gelu" in layer.name for layer in activations)
    # The whitening's, two per stem stage, one per TCN convolution.
    assert len(activations) == 1 + 2 * 2 + 2 * 2
    x = np.linspace(-3, 3, 13, dtype=np.float32)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(
        activations[0](x), x * 0.5 * (1 + erf(x / np.sqrt(2))), rtol=1e-5, atol=1e-6
    )
    relu_model = build_model(WHITENED)
    assert sum(isinstance(layer, keras.layers.ReLU) for layer in relu_model.layers) == 9
    assert relu_model.count_params() == model.count_params()


def test_the_norm_momentum_reaches_every_batch_norm() -> None:
    from image_classifier.layers import FusedBatchNormalization

    model = build_model(dataclasses.replace(WHITENED, norm_momentum=0.4))
    norms = [layer for layer in model.layers if isinstance(layer, FusedBatchNormalization)]
    assert len(norms) == 2 * 2 + 2 * 2
    assert {layer.momentum for layer in norms} == {0.4}
    # Keras' convention: after one training batch the running mean moves 60% of the way.
    norm = norms[0]
    x = np.full((4, *norm.input.shape[1:]), 5.0, np.float32)
    norm(x, training=True)
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.6 * 5.0, rtol=1e-6)


def test_dirac_init_starts_each_stem_convolution_with_identity_filters() -> None:
    keras.utils.set_random_seed(1)
    plain = build_model(WHITENED)
    keras.utils.set_random_seed(1)
    model = build_model(dataclasses.replace(WHITENED, dirac_init=True))
    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    assert [layer.name for layer in convs] == [f"stem{s}_{c}_conv" for s in (0, 1) for c in (0, 1)]
    for layer in convs:
        kernel = layer.kernel.numpy()
        shared = min(kernel.shape[2:])
        # The identity filters pass their input channel through at the centre tap.
        x = np.random.default_rng(0).normal(size=(1, 5, 5, kernel.shape[2])).astype(np.float32)
        y = tf.nn.conv2d(x, kernel, 1, "SAME").numpy()
        np.testing.assert_allclose(y[..., :shared], x[..., :shared], atol=1e-6)
        # The other filters keep kernel_init's values.
        original = plain.get_layer(layer.name).kernel.numpy()
        np.testing.assert_array_equal(kernel[..., shared:], original[..., shared:])
    # The TCN's convolutions and the frozen whitening are left as they were.
    np.testing.assert_array_equal(
        model.get_layer("tcn0_d1_conv0").kernel.numpy(),
        plain.get_layer("tcn0_d1_conv0").kernel.numpy(),
    )


def test_the_logit_scale_multiplies_the_classifiers_output() -> None:
    keras.utils.set_random_seed(3)
    model = build_model(dataclasses.replace(WHITENED, logit_scale=1 / 9))
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    unscaled = keras.Model(model.input, model.get_layer("logits").output)(images).numpy()
    np.testing.assert_allclose(model(images), unscaled / 9, rtol=1e-6)
    # A layer of the classifier, without weights or FLOPs of its own.
    assert parameters_by_part(model)["classifier"] == model.get_layer("logits").count_params()


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"activation": "tanh"}, "activation must be one of"),
        ({"norm_momentum": 1.0}, "norm_momentum must be in"),
        ({"norm_momentum": -0.1}, "norm_momentum must be in"),
        ({"logit_scale": 0.0}, "logit_scale must be positive"),
    ],
)
def test_an_unknown_activation_or_out_of_range_norm_momentum_or_logit_scale_is_refused(
    field: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_config(ModelConfig(**field))  # type: ignore[arg-type]


def test_an_unknown_readout_is_refused() -> None:
    with pytest.raises(ValueError, match="readout"):
        validate_config(ModelConfig(readout="first"))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", [{"kernel_size": 1}, {"convs_per_block": 0}])
def test_a_tcn_block_without_a_convolution_or_a_tap_is_refused(field: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="kernel_size must be at least 2 and convs_per_block"):
        validate_config(ModelConfig(**field))  # type: ignore[arg-type]


def test_whitening_and_token_pooling_shape_the_token_grid() -> None:
    # 32 -> 31 (2x2 patches, no padding) -> 15 -> 7 -> 3 (token pooling): 9 tokens.
    assert token_grid_side(WHITENED) == 3
    assert sequence_length(WHITENED) == 9
    model = build_model(WHITENED)
    assert model.get_layer("stem_whiten").output.shape[1:] == (31, 31, 24)
    assert model.get_layer("to_sequence").output.shape[1:] == (9, 16)
    assert model(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="too many stem stages"):
        validate_config(ModelConfig(stem_filters=(8, 16, 32), whiten_patch=2, token_pool=4))
    with pytest.raises(ValueError, match="need stem_filters"):
        validate_config(ModelConfig(stem_filters=(), token_pool=2, dilations=(1, 2, 4, 8, 16)))


def test_whitening_kernel_decorrelates_patches() -> None:
    rng = np.random.default_rng(0)
    # Strongly correlated pixels: one shared component plus a little noise per value.
    base = rng.normal(size=(400, 8, 8, 1))
    images = (base + 0.1 * rng.normal(size=(400, 8, 8, 3))).astype(np.float32)
    kernel = whitening_kernel(images, 2)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
    responses = tf.nn.conv2d(images, kernel[..., :12], 1, "VALID").numpy().reshape(-1, 12)
    covariance = responses.T @ responses / len(responses)
    # Unit variance up to the epsilon that keeps the smallest directions finite.
    np.testing.assert_allclose(covariance, np.eye(12), atol=0.05)


def test_the_whitening_epsilon_damps_the_faint_directions() -> None:
    rng = np.random.default_rng(0)
    # Pixel values with one loud shared component and faint independent noise.
    base = rng.normal(size=(400, 8, 8, 1))
    images = (base + 0.03 * rng.normal(size=(400, 8, 8, 3))).astype(np.float32)
    patches = np.stack(
        [images[:, dy : 7 + dy, dx : 7 + dx] for dy in range(2) for dx in range(2)], axis=3
    ).reshape(-1, 12)
    eigenvalues = np.linalg.eigvalsh(patches.T.astype(np.float64) @ patches / len(patches))
    for epsilon in (5e-4, 1e-2):
        kernel = whitening_kernel(images, 2, epsilon=epsilon)[..., :12]
        responses = tf.nn.conv2d(images, kernel, 1, "VALID").numpy().reshape(-1, 12)
        variances = np.sort(responses.var(axis=0) + responses.mean(axis=0) ** 2)
        # Each direction comes out with variance lambda / (lambda + epsilon).
        np.testing.assert_allclose(variances, eigenvalues / (eigenvalues + epsilon), rtol=1e-3)
    assert eigenvalues[0] / (eigenvalues[0] + 1e-2) < 0.2  # the faint ones are damped
    with pytest.raises(ValueError, match="whiten_epsilon"):
        validate_config(ModelConfig(whiten_epsilon=0.0))


def test_init_whitening_sets_the_frozen_first_layer_from_the_images() -> None:
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    model = build_model(WHITENED)
    layer = model.get_layer("stem_whiten")
    assert not layer.trainable and not layer.trainable_weights
    init_whitening(model, images, WHITENED)
    standardized = (images / 255.0 - np.asarray(WHITENED.mean)) / np.asarray(WHITENED.std)
    np.testing.assert_allclose(
        layer.get_weights()[0], whitening_kernel(standardized, 2), rtol=1e-4, atol=1e-4
    )
    damped = dataclasses.replace(WHITENED, whiten_epsilon=1e-2)
    init_whitening(model, images, damped)  # the config's epsilon reaches the kernel
    np.testing.assert_allclose(
        layer.get_weights()[0],
        whitening_kernel(standardized, 2, epsilon=1e-2),
        rtol=1e-4,
        atol=1e-4,
    )
    model.compile(optimizer="sgd", loss="mse")
    before = layer.get_weights()[0].copy()
    model.fit(images / 255.0, np.zeros((64, 10)), epochs=1, batch_size=32, verbose=0)
    np.testing.assert_array_equal(layer.get_weights()[0], before)  # training leaves it alone


@pytest.mark.parametrize("shape", [(32, 6, 6, 5), (32, 12, 5), (32, 5)], ids=["2d", "1d", "flat"])
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_the_fused_batch_norm_trains_like_keras_batch_norm(
    shape: tuple[int, ...], dtype: str
) -> None:
    """Same outputs, gradients and moving statistics as Keras' layer, which it replaces only
    for speed; inference is Keras' own code path."""
    from image_classifier.layers import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 3.0, shape).astype(np.float32))
    layers = [
        keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-5, dtype=dtype),
        FusedBatchNormalization(momentum=0.8, epsilon=1e-5, dtype=dtype),
    ]
    outputs, input_grads, gamma_grads = [], [], []
    for layer in layers:
        layer.build(shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, training=True), tf.float32)
            loss = tf.reduce_sum(y * tf.sin(y))
        grads = tape.gradient(loss, [x, layer.gamma])
        outputs.append(y.numpy())
        input_grads.append(grads[0].numpy())
        gamma_grads.append(grads[1].numpy())
    keras_bn, fused = layers
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
    assert outputs[1].dtype == outputs[0].dtype
    np.testing.assert_allclose(outputs[1], outputs[0], atol=tolerance * 10)
    np.testing.assert_allclose(input_grads[1], input_grads[0], atol=tolerance * 10)
    np.testing.assert_allclose(gamma_grads[1], gamma_grads[0], rtol=tolerance)
    # Keras tracks the biased batch variance; the fused kernel's own output is unbiased.
    np.testing.assert_allclose(fused.moving_mean, keras_bn.moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance, keras_bn.moving_variance, rtol=1e-5)
    np.testing.assert_allclose(
        fused(x, training=False), keras_bn(x, training=False), rtol=1e-6, atol=1e-6
    )


def test_the_model_normalizes_with_the_fused_layer_and_reads_keras_checkpoints(
    tmp_path: Path,
) -> None:
    from image_classifier.layers import FusedBatchNormalization

    model = build_model(SMALL)
    norms = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert norms and all(isinstance(layer, FusedBatchNormalization) for layer in norms)
    # The variables are Keras' own (versions trained with Keras' layer read into this one:
    # test_shipped_model's re-export check), and its statistics survive a save and a load.
    images = np.random.default_rng(1).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    model(images, training=True)  # moves the statistics away from their initial values
    path = str(tmp_path / "weights.weights.h5")
    model.save_weights(path)
    copy = build_model(SMALL)
    copy.load_weights(path)
    np.testing.assert_allclose(copy(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("taps", "dilation", "steps"),
    [(3, 1, 9), (3, 4, 9), (2, 8, 9), (5, 2, 7), (3, 16, 9)],
    ids=["d1", "d4", "k2-d8", "k5-d2", "padding-longer-than-the-sequence"],
)
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_the_causal_convolution_computes_keras_conv1d(
    taps: int, dilation: int, steps: int, dtype: str
) -> None:
    """Same outputs and gradients (inputs, kernel, bias) as Keras' causal ``Conv1D`` with the
    same variables, which it replaces only for speed."""
    from image_classifier.layers import CausalConv1D

    rng = np.random.default_rng(taps * 100 + dilation)
    x = tf.constant(rng.normal(size=(4, steps, 6)).astype(np.float32))
    settings = dict(
        filters=5, kernel_size=taps, padding="causal", dilation_rate=dilation, activation="relu"
    )
    layers = [keras.layers.Conv1D(**settings, dtype=dtype), CausalConv1D(**settings, dtype=dtype)]
    layers[0].build(x.shape)
    layers[1].build(x.shape)
    kernel = rng.normal(size=(taps, 6, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    results = []
    for layer in layers:
        assert [tuple(v.shape) for v in layer.weights] == [(taps, 6, 5), (5,)]
        layer.set_weights([kernel, bias])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x), tf.float32)
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append([y, *tape.gradient(loss, [x, layer.kernel, layer.bias])])
    tolerance = 1e-5 if dtype == "float32" else 5e-2  # bfloat16 keeps 8 bits of mantissa
    assert results[1][0].dtype == results[0][0].dtype
    assert float(tf.reduce_max(tf.abs(results[0][0]))) > 0  # the ReLU let something through
    for ours, theirs in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance)


def test_the_causal_convolution_runs_keras_code_where_it_does_not_apply() -> None:
    """An unknown sequence length (or another padding) is Keras' own Conv1D path."""
    from image_classifier.layers import CausalConv1D

    x = np.random.default_rng(2).normal(size=(2, 7, 3)).astype(np.float32)
    inputs = keras.Input((None, 3))
    ours = CausalConv1D(4, 3, padding="causal", dilation_rate=2)
    model = keras.Model(inputs, ours(inputs))
    reference = keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2)
    reference.build((None, None, 3))
    reference.set_weights(ours.get_weights())
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-5)
    same = CausalConv1D(4, 3, padding="same")
    same.build((None, 7, 3))
    plain = keras.layers.Conv1D(4, 3, padding="same")
    plain.build((None, 7, 3))
    plain.set_weights(same.get_weights())
    np.testing.assert_allclose(same(x), plain(x), rtol=1e-5, atol=1e-5)


def test_the_tcn_convolves_with_the_causal_layer() -> None:
    from image_classifier.layers import CausalConv1D

    model = build_model(SMALL)
    convs = [
        layer for layer in model.layers if layer.name.startswith("tcn") and "conv" in layer.name
    ]
    assert len(convs) == len(SMALL.dilations) * SMALL.convs_per_block
    assert all(isinstance(layer, CausalConv1D) for layer in convs)
    # Still counted as convolutions: the TCN's FLOPs and parameters stay on the card.
    assert flops_by_part(model)["tcn"] > 0
    # The point of the layer: no SpaceToBatchND reshuffling around the dilated convolutions
    # (a 1x1 skip convolution, where the widths differ, is undilated and never had any).
    stack = _stack_model(SMALL, steps=9)
    graph = tf.function(stack).get_concrete_function(tf.TensorSpec((1, 9, 4), tf.float32)).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "MatMul" in op_types or "BatchMatMulV2" in op_types
    assert not op_types & {"SpaceToBatchND", "BatchToSpaceND"}


def _pillow_jpeg_420(images: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    decoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=2)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(decoded)


def test_chroma_subsampling_keeps_luma_and_gives_a_picture_its_jpegs_colour() -> None:
    from image_classifier.layers import ChromaSubsample

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    images[8:] = np.repeat(np.repeat(images[8:, ::4, ::4], 4, axis=1), 4, axis=2)  # smoother
    pixels = images / np.float32(255)
    out = np.asarray(ChromaSubsample()(pixels))
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(out @ luma, pixels @ luma, atol=1e-5)  # Y untouched
    flat = np.full((1, 32, 32, 3), (0.9, 0.2, 0.4), np.float32)
    np.testing.assert_allclose(np.asarray(ChromaSubsample()(flat)), flat, atol=1e-5)

    # What a lossless JPEG with 4:2:0 chroma (Pillow's default) decodes to: the layer's output
    # is within rounding of it, and far closer than the untouched picture.
    jpeg = _pillow_jpeg_420(images, 100) / 255.0
    layer_error = np.sqrt(np.mean((out - jpeg) ** 2))
    picture_error = np.sqrt(np.mean((pixels - jpeg) ** 2))
    assert layer_error < 0.5 * picture_error, (layer_error, picture_error)
    assert layer_error < 2 / 255


def test_a_chroma_subsampling_model_whitens_what_that_layer_passes_on() -> None:
    from image_classifier.layers import ChromaSubsample

    config = dataclasses.replace(WHITENED, chroma_subsample=True)
    model = build_model(config)
    assert model.layers[1].name == "chroma_subsample"  # first, before the standardization
    images = np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    init_whitening(model, images, config)
    filtered = np.asarray(ChromaSubsample()(images / np.float32(255)))
    standardized = (filtered - np.asarray(config.mean)) / np.asarray(config.std)
    np.testing.assert_allclose(
        model.get_layer("stem_whiten").get_weights()[0],
        whitening_kernel(standardized, 2),
        rtol=1e-3,
        atol=1e-3,
    )


@pytest.mark.parametrize("taps", [3, 5])
@pytest.mark.parametrize("side", [31, 30, 15, 7, 2])
def test_blur_pooling_is_a_max_at_stride_1_then_a_binomial_blur_at_stride_2(
    side: int, taps: int
) -> None:
    from image_classifier.layers import BlurPool2D

    x = np.random.default_rng(side).random((2, side, side, 5)).astype(np.float32)
    if side - 1 < (taps - 1) // 2:  # too small a grid to mirror: a clear error, not TF's
        with pytest.raises(ValueError, match="grids of at least"):
            BlurPool2D(taps=taps)(x)
        return
    out = np.asarray(BlurPool2D(taps=taps)(x))
    assert out.shape == tuple(keras.layers.MaxPooling2D(2)(x).shape)  # the same grid
    maxed = tf.nn.max_pool2d(x, 2, 1, "VALID")
    edge = (taps - 1) // 2
    padded = tf.pad(maxed, [[0, 0], [edge, edge], [edge, edge], [0, 0]], mode="SYMMETRIC")
    row = {3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}[taps]
    binomial = np.outer(row, row) / np.float32(sum(row) ** 2)
    kernel = np.repeat(binomial[:, :, None, None], 5, axis=2).astype(np.float32)
    expected = tf.nn.depthwise_conv2d(padded, kernel, [1, 2, 2, 1], "VALID")
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="taps"):
        BlurPool2D(taps=4)


def test_blur_pooling_answers_a_one_pixel_shift_more_steadily_than_max_pooling() -> None:
    """The point of it (Zhang 2019): the pooled grid of a picture and of the same picture one
    pixel over differ less, because detail finer than the new grid is not folded into it."""
    from image_classifier.layers import BlurPool2D

    rng = np.random.default_rng(0)
    # Blocks of 4x4 pixels (shapes larger than the new grid) under fine noise (texture).
    blocks = np.repeat(np.repeat(rng.random((8, 8, 9, 4)), 4, axis=1), 4, axis=2)[:, :32, :33]
    x = (0.7 * blocks + 0.3 * rng.random((8, 32, 33, 4))).astype(np.float32)
    original, shifted = x[:, :, :32], x[:, :, 1:]
    agreement = {}
    pools = [
        ("max", keras.layers.MaxPooling2D(2)),
        ("blur", BlurPool2D()),
        ("blur5", BlurPool2D(taps=5)),
    ]
    for name, pool in pools:
        a, b = np.asarray(pool(original)), np.asarray(pool(shifted))
        inner = (slice(None), slice(1, -1), slice(1, -1))  # away from the edges
        agreement[name] = np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1]
    assert agreement["blur"] > agreement["max"] + 0.05, agreement
    assert agreement["blur5"] > agreement["blur"], agreement  # the stronger low-pass


@pytest.mark.parametrize(("pooling", "taps"), [("blur", 3), ("blur5", 5)])
def test_a_blur_pooling_model_has_the_same_grid_and_weights_and_counts_its_filters(
    pooling: Pooling, taps: int
) -> None:
    blurred = dataclasses.replace(WHITENED, pooling=pooling)
    plain, model = build_model(WHITENED), build_model(blurred)
    names = [layer.name for layer in model.layers if type(layer).__name__ == "BlurPool2D"]
    assert names == ["stem0_0_pool", "stem1_0_pool", "stem_token_pool"]
    assert model.count_params() == plain.count_params()
    tokens = model.get_layer("to_sequence").output.shape
    assert tokens == plain.get_layer("to_sequence").output.shape
    # Each blur is a taps x taps filter per channel at every output position: 15x15x8, 7x7x16,
    # 3x3x16.
    blur_flops = 2 * taps**2 * (15 * 15 * 8 + 7 * 7 * 16 + 3 * 3 * 16)
    assert flops_by_part(model)["stem"] == flops_by_part(plain)["stem"] + blur_flops
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    assert np.isfinite(np.asarray(model(images, training=False))).all()
    assert ModelConfig.from_dict(json.loads(blurred.to_json())) == blurred
    with pytest.raises(ValueError, match="pooling"):
        validate_config(dataclasses.replace(WHITENED, pooling="average"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_pool"):
        validate_config(dataclasses.replace(WHITENED, pooling=pooling, token_pool=3))
