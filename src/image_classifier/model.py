"""The classifier: a convolutional stem that turns the image into a token sequence, then a TCN.

How the image becomes a sequence
    The stem is stages of 3x3 convolutions, each halving the grid with 2x2 max-pooling (or,
    with ``pooling="blur"``, its anti-aliased form). It opens either with a trained 3x3
    convolution (32x32 -> 16x16 -> 8x8 with two stages) or, with ``whiten_patch=2``, with a
    frozen 2x2 patch-whitening convolution computed from the training images (airbench's first
    layer; no padding, so 31x31 -> 15x15 -> 7x7). ``token_pool`` pools the last grid once more
    (7x7 -> 3x3). The grid is read in raster order (row by
    row, left to right) as a sequence of tokens of ``stem_filters[-1]`` channels. With no stem
    (``stem_filters=()``) the sequence is the image itself: ``layout="rows"`` gives 32 steps of
    96 values (one pixel row per step), ``layout="raster"`` 1024 steps of 3 values (sequential
    CIFAR, as in the TCN paper).

The TCN (Bai, Kolter & Koltun 2018)
    Residual blocks, each two dilated *causal* 1-D convolutions (output ``t`` sees only inputs
    ``<= t``) with normalization, ReLU (or GELU) and dropout, plus a skip connection (1x1
    convolution when the width changes). Dilations double per block, so the receptive field is
    ``1 + convs_per_block * (kernel_size - 1) * sum(dilations)`` steps; the classifier reads the
    **last** step, which therefore sees the whole sequence only if the receptive field covers it:
    :func:`build_model` refuses a configuration where it does not. On a raster-ordered grid of
    side s, dilation s links vertically adjacent tokens, so the stack mixes rows as well as
    columns. (``readout`` can average or max-pool all the steps instead.)

Input standardization (per-channel mean/std of the training set) is the model's first layer,
so every caller sends float32 RGB in [0, 1]. The model returns logits; the export divides them by
the fitted temperature and adds softmax.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from image_classifier.constants import IMAGE_SIZE, INPUT_SHAPE, NUM_CLASSES
from image_classifier.errors import ConfigError

if TYPE_CHECKING:
    import keras

# CIFAR-10 training-set statistics; train.py recomputes them from the data actually used.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
WHITENING_SAMPLE = 5000
# What the classifier can read from the TCN's output steps (``ModelConfig.readout``).
Readout = Literal["last", "mean", "max"]
READOUTS: tuple[str, ...] = get_args(Readout)
# How the stem halves its grids (``ModelConfig.pooling``).
Pooling = Literal["max", "blur", "blur5"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
# The binomial filter's width of each anti-aliased pooling (layers.BlurPool2D).
BLUR_TAPS = {"blur": 3, "blur5": 5}
# The nonlinearity after every normalization (``ModelConfig.activation``).
Activation = Literal["relu", "gelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the architecture; saved with every export."""

    stem_filters: tuple[int, ...] = (64, 128)
    stem_convs_per_stage: int = 2
    # 0: the stem opens with a trained 3x3 convolution of ``stem_filters[0] // 2`` channels.
    # p > 0: it opens with a frozen p x p patch-whitening convolution (no padding, so the
    # grid loses p - 1 pixels), 2 * 3 * p * p channels set from the training images by
    # :func:`whitening_kernel` (airbench's first layer: a head start for short training).
    whiten_patch: int = 0
    # Added to every eigenvalue before whitening: directions with variance well below it come
    # out damped rather than scaled up to unit variance. The faintest directions of 2x2
    # patches (fine chroma detail) are the ones JPEG compression rewrites; damping them did
    # not narrow the JPEG gap in the recipe search (docs/model-research.md), so airbench's
    # value stays.
    whiten_epsilon: float = 5e-4
    # True: the first layer brings every image's chroma to a default JPEG's half resolution
    # (layers.ChromaSubsample), so lossless pictures and JPEG uploads differ less to the model.
    chroma_subsample: bool = False
    # Max-pool the stem's last grid by this factor before reading it as tokens (1: none).
    token_pool: int = 1
    # How the stem halves its grids (and pools tokens by 2): "max" is 2x2 max-pooling, "blur"
    # the anti-aliased max of layers.BlurPool2D (a max at stride 1, then a 3-tap binomial blur
    # at stride 2), so detail finer than the new grid, such as a JPEG's blocking, is not folded
    # in; "blur5" the same with a 5-tap blur, a stronger low-pass.
    pooling: Pooling = "max"
    layout: Literal["raster", "rows"] = "raster"
    tcn_filters: int = 128
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16)
    convs_per_block: int = 2
    norm: Literal["batch", "layer"] = "batch"
    # False: normalization layers learn only a bias, their scale fixed at 1 (airbench's
    # BatchNorm). Before a ReLU and a scale-free next layer, a learned scale mostly changes the
    # step size the weights see, which the learning rate and weight decay already set.
    norm_scale: bool = True
    # Keras' convention: the weight of the old running average at each training step.
    # Airbench's PyTorch momentum 0.6 (the weight of the new batch) is 0.4 here.
    norm_momentum: float = 0.9
    # "gelu" (exact, erf-based) is airbench's nonlinearity; "relu" the TCN paper's.
    activation: Activation = "relu"
    dropout: float = 0.0
    # "fan_in_uniform" is U(+-1/sqrt(fan_in)) (PyTorch's default); it trained to higher accuracy
    # than Keras' glorot_uniform in the recipe search (docs/model-research.md).
    kernel_init: Literal["fan_in_uniform", "glorot_uniform"] = "fan_in_uniform"
    # True: every trained 3x3 convolution of the stem starts with its first min(in, out)
    # filters as the identity (airbench's partial Dirac initialization), the rest as
    # ``kernel_init`` makes them, so each stage starts close to passing its input through.
    dirac_init: bool = False
    # False builds the ablation that measures what the TCN adds: the stem's tokens are
    # average-pooled (max-pooled with ``readout="max"``, airbench's head) straight into the
    # classifier, everything else unchanged.
    tcn: bool = True
    # What the classifier reads from the TCN's output sequence: the last step (the TCN paper's
    # sequence classifier; it alone has seen every token) or the mean / max over all steps
    # (each step has seen the tokens up to it). Over the full recipe the mean tied the last
    # step and the max trained badly (README, Model).
    readout: Readout = "last"
    # The logits are multiplied by this before the loss (airbench: 1/9). It changes how hard
    # the classifier is pulled by every step, not what the network can express; the export's
    # fitted temperature comes after it.
    logit_scale: float = 1.0
    num_classes: int = NUM_CLASSES
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        check_config_keys(cls, values, "model")
        converted = {
            key: tuple(value) if isinstance(value, list) else value for key, value in values.items()
        }
        return cls(**converted)  # type: ignore[arg-type]  # values from JSON, checked in use

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_config_keys(config_class: Any, values: dict[str, Any], what: str) -> None:
    """Refuse keys that are not fields of the config dataclass (a typo would be ignored)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {sorted(unknown)} (known: {sorted(known)})")


def token_grid_side(config: ModelConfig) -> int:
    """Side of the square grid the stem turns into tokens (floor division at every pooling)."""
    side = IMAGE_SIZE - max(0, config.whiten_patch - 1)
    for _ in config.stem_filters:
        side //= 2
    return side // config.token_pool


def sequence_length(config: ModelConfig) -> int:
    """Number of steps the TCN sees."""
    if config.stem_filters:
        return token_grid_side(config) ** 2
    return IMAGE_SIZE if config.layout == "rows" else IMAGE_SIZE * IMAGE_SIZE


def receptive_field(config: ModelConfig) -> int:
    """How many input steps the last output step depends on."""
    return 1 + config.convs_per_block * (config.kernel_size - 1) * sum(config.dilations)


def validate_config(config: ModelConfig) -> None:
    if config.whiten_patch < 0 or config.token_pool < 1:
        raise ConfigError("whiten_patch must be >= 0 and token_pool >= 1")
    if not config.whiten_epsilon > 0:
        raise ConfigError("whiten_epsilon must be positive")
    if (config.whiten_patch or config.token_pool > 1) and not config.stem_filters:
        raise ConfigError("whiten_patch and token_pool shape the stem; they need stem_filters")
    if config.stem_filters and token_grid_side(config) < 1:
        raise ConfigError("too many stem stages (or too much token pooling) for a 32x32 image")
    if config.pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, not {config.pooling!r}")
    if config.pooling != "max" and config.token_pool not in (1, 2):
        # BlurPool2D halves a grid; a larger token pool would silently stay a plain max.
        raise ConfigError(f"pooling {config.pooling!r} halves grids: it needs token_pool 1 or 2")
    if config.readout not in READOUTS:
        raise ConfigError(f"readout must be one of {READOUTS}, not {config.readout!r}")
    if config.activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, not {config.activation!r}")
    if not 0.0 <= config.norm_momentum < 1.0:
        raise ConfigError(f"norm_momentum must be in [0, 1), got {config.norm_momentum}")
    if not config.logit_scale > 0:
        raise ConfigError(f"logit_scale must be positive, got {config.logit_scale}")
    if config.kernel_size < 2 or config.convs_per_block < 1:
        raise ConfigError("kernel_size must be at least 2 and convs_per_block at least 1")
    if not config.dilations or any(d < 1 for d in config.dilations):
        raise ConfigError("dilations must be positive integers")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError("dropout must be in [0, 1)")
    if not config.tcn:
        if not config.stem_filters:
            raise ConfigError("a model without the TCN needs a stem")
        return
    rf, length = receptive_field(config), sequence_length(config)
    if rf < length:
        raise ConfigError(
            f"receptive field {rf} is shorter than the sequence ({length} steps): "
            "the last step would not see the whole image; add dilations"
        )


def build_model(config: ModelConfig | None = None) -> keras.Model:
    """Build the (uncompiled) Keras model: [0, 1] RGB images in, logits out."""
    import keras
    from keras import layers

    config = config or ModelConfig()
    validate_config(config)

    inputs = keras.Input(shape=INPUT_SHAPE, name="images", dtype="float32")
    mean = [float(m) for m in config.mean]
    variance = [float(s) ** 2 for s in config.std]
    x = inputs
    if config.chroma_subsample:
        from image_classifier.layers import ChromaSubsample

        x = ChromaSubsample(name="chroma_subsample")(x)
    x = layers.Normalization(mean=mean, variance=variance, name="standardize")(x)

    if config.stem_filters:
        x = _stem(x, config)
        if config.token_pool > 1:
            x = _pool(config, config.token_pool, "stem_token_pool")(x)
        side = token_grid_side(config)
        x = layers.Reshape((side * side, config.stem_filters[-1]), name="to_sequence")(x)
    elif config.layout == "rows":
        x = layers.Reshape((IMAGE_SIZE, IMAGE_SIZE * INPUT_SHAPE[2]), name="to_sequence")(x)
    else:
        x = layers.Reshape((IMAGE_SIZE * IMAGE_SIZE, INPUT_SHAPE[2]), name="to_sequence")(x)

    if config.tcn:
        x = tcn_stack(x, config)
        if config.readout == "mean":
            x = layers.GlobalAveragePooling1D(name="mean_over_steps")(x)
        elif config.readout == "max":
            x = layers.GlobalMaxPooling1D(name="max_over_steps")(x)
        else:
            x = layers.Lambda(lambda t: t[:, -1, :], name="last_step")(x)
    elif config.readout == "max":
        # Without the TCN the tokens have no order to read the last of; "max" is airbench's
        # global max-pooling, anything else the mean.
        x = layers.GlobalMaxPooling1D(name="pool_tokens")(x)
    else:
        x = layers.GlobalAveragePooling1D(name="pool_tokens")(x)
    logits = layers.Dense(
        config.num_classes, kernel_initializer=_init(config), dtype="float32", name="logits"
    )(x)
    if config.logit_scale != 1:
        logits = layers.Rescaling(config.logit_scale, dtype="float32", name="logits_scale")(logits)
    model = keras.Model(inputs, logits, name="tcn_classifier")
    if config.dirac_init:
        _dirac_init(model)
    return model


def _dirac_init(model: keras.Model) -> None:
    """Make the first min(in, out) filters of every stem 3x3 convolution an identity."""
    for layer in model.layers:
        if not (layer.name.startswith("stem") and layer.name.endswith("_conv")):
            continue
        kernel = layer.kernel.numpy()  # (3, 3, in, out)
        height, width, channels_in, channels_out = kernel.shape
        shared = min(channels_in, channels_out)
        kernel[..., :shared] = 0.0
        kernel[height // 2, width // 2, np.arange(shared), np.arange(shared)] = 1.0
        layer.kernel.assign(kernel)


def _init(config: ModelConfig) -> keras.initializers.Initializer | str:
    import keras

    if config.kernel_init == "fan_in_uniform":
        return keras.initializers.VarianceScaling(1 / 3, mode="fan_in", distribution="uniform")
    return config.kernel_init


def _norm(config: ModelConfig, name: str) -> keras.layers.Layer:
    from keras import layers

    if config.norm == "layer":
        return layers.LayerNormalization(scale=config.norm_scale, name=name)
    return _batch_norm(config, name)


def _batch_norm(config: ModelConfig, name: str) -> keras.layers.Layer:
    # Keras' arithmetic on TensorFlow's fused kernel: 1.4x faster training steps on the CPU.
    from image_classifier.layers import FusedBatchNormalization

    return FusedBatchNormalization(
        momentum=config.norm_momentum, epsilon=1e-5, scale=config.norm_scale, name=name
    )


def _activation(config: ModelConfig, name: str) -> keras.layers.Layer:
    from keras import layers

    if config.activation == "gelu":
        return layers.Activation("gelu", name=name)
    return layers.ReLU(name=name)


def _pool(config: ModelConfig, size: int, name: str) -> keras.layers.Layer:
    from keras import layers

    if config.pooling != "max":
        from image_classifier.layers import BlurPool2D

        return BlurPool2D(taps=BLUR_TAPS[config.pooling], name=name)
    return layers.MaxPooling2D(size, name=name)


def _stem(x: keras.KerasTensor, config: ModelConfig) -> keras.KerasTensor:
    from keras import layers

    if config.whiten_patch:
        # Frozen: train.py sets its kernel from the data. Each whitened direction comes with
        # its negation, so the ReLU after it keeps both signs.
        x = layers.Conv2D(
            whitening_channels(config.whiten_patch),
            config.whiten_patch,
            padding="valid",
            use_bias=False,
            trainable=False,
            name="stem_whiten",
        )(x)
    else:
        x = layers.Conv2D(
            config.stem_filters[0] // 2,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=_init(config),
            name="stem_in",
        )(x)
        x = _batch_norm(config, "stem_in_bn")(x)
    x = _activation(config, f"stem_in_{config.activation}")(x)
    for stage, filters in enumerate(config.stem_filters):
        for conv in range(config.stem_convs_per_stage):
            prefix = f"stem{stage}_{conv}"
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=_init(config),
                name=f"{prefix}_conv",
            )(x)
            if conv == 0:
                # Pool right after the first conv: the rest of the stage runs at 1/4 the cost.
                x = _pool(config, 2, f"{prefix}_pool")(x)
            x = _batch_norm(config, f"{prefix}_bn")(x)
            x = _activation(config, f"{prefix}_{config.activation}")(x)
    return x


def whitening_channels(patch: int) -> int:
    return 2 * INPUT_SHAPE[2] * patch * patch


def whitening_kernel(images: np.ndarray, patch: int, *, epsilon: float = 5e-4) -> np.ndarray:
    """Conv2D kernel (patch, patch, 3, 2 * 3 * patch**2) that whitens ``patch`` x ``patch`` patches.

    ``images`` are standardized (N, H, W, 3) floats. The patches' (uncentred) covariance
    ``C = V diag(lambda) V^T`` gives filters ``v_i / sqrt(lambda_i + epsilon)``: the filter
    responses are decorrelated with unit variance. Each filter is followed by its negation.
    """
    _, height, width, channels = images.shape
    rows = []
    for dy in range(patch):
        for dx in range(patch):
            rows.append(images[:, dy : height - patch + 1 + dy, dx : width - patch + 1 + dx, :])
    # (N, H', W', patch*patch, C) -> flat patches in (dy, dx, c) order, the kernel's layout.
    patches = np.stack(rows, axis=3).reshape(-1, patch * patch * channels).astype(np.float64)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + epsilon)  # one per column
    kernel = np.concatenate([filters, -filters], axis=1)
    return kernel.reshape(patch, patch, channels, -1).astype(np.float32)


def init_whitening(model: keras.Model, images: np.ndarray, config: ModelConfig) -> None:
    """Set the stem's whitening kernel from uint8 training ``images`` (a no-op without one).

    Patch statistics settle long before 5,000 images (airbench uses as many), so an evenly
    spaced sample of that size keeps this to a second.
    """
    from image_classifier.preprocess import normalize

    if not config.whiten_patch:
        return
    step = max(1, len(images) // WHITENING_SAMPLE)
    sample = normalize(images[::step][:WHITENING_SAMPLE])
    if config.chroma_subsample:
        # The whitening layer sees what the chroma layer before it passes on.
        from image_classifier.layers import ChromaSubsample

        sample = np.asarray(ChromaSubsample()(sample))
    # What the "standardize" layer (built from the same config statistics) passes on, computed
    # in float32 here: under mixed precision that layer would round it to bfloat16.
    standardized = (sample - np.asarray(config.mean, np.float32)) / np.asarray(
        config.std, np.float32
    )
    model.get_layer("stem_whiten").set_weights(
        [whitening_kernel(standardized, config.whiten_patch, epsilon=config.whiten_epsilon)]
    )


def tcn_stack(x: keras.KerasTensor, config: ModelConfig) -> keras.KerasTensor:
    """Residual blocks of dilated causal convolutions over ``x`` (batch, steps, channels)."""
    from keras import layers

    from image_classifier.layers import CausalConv1D

    for block, dilation in enumerate(config.dilations):
        prefix = f"tcn{block}_d{dilation}"
        residual = x
        for conv in range(config.convs_per_block):
            x = CausalConv1D(
                config.tcn_filters,
                config.kernel_size,
                padding="causal",
                dilation_rate=dilation,
                use_bias=False,
                kernel_initializer=_init(config),
                name=f"{prefix}_conv{conv}",
            )(x)
            x = _norm(config, f"{prefix}_norm{conv}")(x)
            x = _activation(config, f"{prefix}_{config.activation}{conv}")(x)
            if config.dropout > 0:
                x = layers.SpatialDropout1D(config.dropout, name=f"{prefix}_drop{conv}")(x)
        if residual.shape[-1] != config.tcn_filters:
            residual = layers.Conv1D(
                config.tcn_filters, 1, kernel_initializer=_init(config), name=f"{prefix}_skip"
            )(residual)
        x = layers.Add(name=f"{prefix}_add")([x, residual])
    return x


MODEL_PARTS = ("stem", "tcn", "classifier")


def model_part(layer_name: str) -> str:
    """Which of :data:`MODEL_PARTS` a layer of :func:`build_model` belongs to."""
    if layer_name.startswith("tcn"):
        return "tcn"
    if layer_name.startswith("logits"):
        return "classifier"
    return "stem"


def count_flops(model: keras.Model) -> int:
    """Floating-point operations (2 x multiply-adds) of one forward pass for one image.

    Counts convolutions and dense layers, which are >98% of the work; normalization and
    activations are left out, as is customary.
    """
    return sum(flops_by_part(model).values())


def flops_by_part(model: keras.Model) -> dict[str, int]:
    """:func:`count_flops` split into the stem, the TCN and the classifier."""
    from keras import layers

    from image_classifier.layers import BlurPool2D

    parts = dict.fromkeys(MODEL_PARTS, 0)
    for layer in model.layers:
        flops = 0
        if isinstance(layer, (layers.Conv1D, layers.Conv2D)):
            kernel = layer.kernel.shape  # (*spatial, in, out)
            positions = 1
            for dim in layer.output.shape[1:-1]:
                positions *= int(dim)
            macs_per_position = 1
            for dim in kernel:
                macs_per_position *= int(dim)
            flops = 2 * positions * macs_per_position
        elif isinstance(layer, layers.Dense):
            flops = 2 * int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
        elif isinstance(layer, BlurPool2D):
            # One taps x taps depthwise filter per channel at every output position.
            _, height, width, channels = layer.output.shape
            flops = 2 * layer.taps**2 * int(height) * int(width) * int(channels)
        parts[model_part(layer.name)] += flops
    return parts


def parameters_by_part(model: keras.Model) -> dict[str, int]:
    """Parameters (trainable or not) of the stem, the TCN and the classifier."""
    parts = dict.fromkeys(MODEL_PARTS, 0)
    for layer in model.layers:
        parts[model_part(layer.name)] += int(layer.count_params())
    return parts
