"""Keras layers of the classifier that Keras does not ship in the form training needs.

Imported only by the functions that build a model, so importing the package (the gateway does)
never loads TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="image_classifier")
class FusedBatchNormalization(keras.layers.BatchNormalization):  # type: ignore[misc]
    """``BatchNormalization`` whose training step is TensorFlow's fused kernel.

    Keras 3 normalizes a training batch with a dozen separate float32 ops (moments, then the
    affine transform) and as many in the gradient. On a 2-core CPU that made the model's 15
    normalization layers about a quarter of every training step; ``FusedBatchNormV3`` (one op
    forward, one backward, bfloat16 in and out with float32 statistics) does the same work in
    a fraction of the time. The arithmetic is Keras': the batch's biased variance normalizes
    and feeds the moving variance, with the same momentum. Inference, and anything this layer
    does not fuse (a mask, a non-channel axis, a frozen layer), is Keras' own code, and the
    variables are Keras', so checkpoints read either way.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        rank = len(inputs.shape)
        fusable = (
            training
            and self.trainable
            and mask is None
            and self.axis in (-1, rank - 1)
            and 2 <= rank <= 4
            and not self.renorm
        )
        if not fusable:
            return super().call(inputs, training=training, mask=mask)

        channels = inputs.shape[-1]
        # The fused kernel takes NHWC: (batch, steps, channels) becomes (batch, steps, 1,
        # channels) and (batch, channels) (batch, 1, 1, channels); the statistics are the same.
        if rank == 4:
            images = inputs
        elif rank == 3:
            images = tf.expand_dims(inputs, 2)
        else:
            images = tf.reshape(inputs, (-1, 1, 1, channels))
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones((channels,))
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros((channels,))
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=images,
            scale=scale,
            offset=offset,
            mean=tf.zeros((0,)),
            variance=tf.zeros((0,)),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        # The kernel reports the unbiased (n - 1) variance; Keras tracks the biased one.
        count = tf.cast(tf.size(images) // channels, tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        if rank != 4:
            outputs = tf.reshape(outputs, tf.shape(inputs))
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="image_classifier")
class CausalConv1D(keras.layers.Conv1D):  # type: ignore[misc]
    """Keras' causal ``Conv1D``, computed as one matrix multiply over shifted inputs.

    On a CPU, TensorFlow runs a dilated convolution as SpaceToBatchND, a Conv2D and
    BatchToSpaceND; on the TCN's 9-step sequences that reshuffling around a small multiply
    costs more than the multiply (a one-image call of the export: median 3.7 ms with it,
    3.2 ms with this layer). Output step ``t`` is
    ``sum_i x[t - (k - 1 - i) * d] @ kernel[i]``: stacking the ``k`` shifted copies of the
    causally padded input along the channels makes it one ``(steps, k * in) @ (k * in, out)``
    product, the same arithmetic. The variables are ``Conv1D``'s, so weights trained before
    this layer read into it unchanged; anything else (strides, groups, another padding or an
    unknown length) runs Keras' own code.
    """

    def call(self, inputs: Any) -> Any:
        steps, channels = inputs.shape[1], inputs.shape[-1]
        if (
            self.padding != "causal"
            or self.strides != (1,)
            or self.groups != 1
            or self.data_format != "channels_last"
            or steps is None
            or channels is None
        ):
            return super().call(inputs)
        (taps,) = self.kernel_size
        (dilation,) = self.dilation_rate
        padded = keras.ops.pad(inputs, ((0, 0), ((taps - 1) * dilation, 0), (0, 0)))
        shifted = keras.ops.concatenate(
            [padded[:, tap * dilation : tap * dilation + steps, :] for tap in range(taps)],
            axis=-1,
        )
        # (taps, in, out) -> (taps * in, out): row tap * in + c multiplies channel c of tap.
        kernel = keras.ops.reshape(self.kernel, (taps * channels, self.filters))
        outputs = keras.ops.matmul(shifted, kernel)
        if self.use_bias:
            outputs = keras.ops.add(outputs, self.bias)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


# JPEG's (JFIF's) RGB -> YCbCr matrix: rows give Y, Cb and Cr (offsets left out: every step
# between the two conversions is an average, so they cancel). Constants of the graph, the
# inverse included, so serving computes no matrix inverse.
_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)


@keras.saving.register_keras_serializable(package="image_classifier")
class ChromaSubsample(keras.layers.Layer):  # type: ignore[misc]
    """RGB images with their colour (chroma) brought to the resolution a default JPEG keeps.

    A JPEG with 4:2:0 chroma (Pillow's, browsers' and phones' default) stores Cb and Cr at
    half resolution: libjpeg averages each 2x2 block and its decoder upsamples with a triangle
    filter, which is bilinear interpolation between the block centres. This layer does both to
    every image and leaves luma (Y) alone, so a picture and its JPEG reach the rest of the model
    with the same chroma detail, and the model learns nothing from detail uploads lose. No
    weights; float32 whatever the mixed-precision policy, as it rounds nothing.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs: Any) -> Any:
        ycbcr = tf.einsum("bhwc,dc->bhwd", inputs, tf.constant(_RGB_TO_YCBCR, tf.float32))
        luma, chroma = ycbcr[..., :1], ycbcr[..., 1:]
        height, width = inputs.shape[1], inputs.shape[2]
        blocks = tf.nn.avg_pool2d(chroma, 2, 2, "VALID")
        chroma = tf.image.resize(blocks, (height, width), method="bilinear")
        return tf.einsum(
            "bhwc,dc->bhwd",
            tf.concat([luma, chroma], axis=-1),
            tf.constant(_YCBCR_TO_RGB, tf.float32),
        )


@keras.saving.register_keras_serializable(package="image_classifier")
class BlurPool2D(keras.layers.Layer):  # type: ignore[misc]
    """2x2 max-pooling made anti-aliased (Zhang 2019, "Making Convolutional Networks
    Shift-Invariant Again"): the max over every 2x2 window at stride 1, then a fixed binomial
    blur at stride 2 (edges mirrored), in place of the max at stride 2.

    A max at stride 2 folds detail finer than the new grid back into it as aliasing, so a shift
    of one pixel or a JPEG's blocking and ringing change what the next layer sees by more than
    they change the picture. Blurring before subsampling keeps the max's selectivity and drops
    the folded detail. ``taps`` is the filter's width: 3 ([1, 2, 1]) or 5 ([1, 4, 6, 4, 1], a
    stronger low-pass). The output grid is ``MaxPooling2D(2)``'s (``floor(side / 2)``); no
    weights; the same filter on every channel.
    """

    TAPS = (3, 5)

    def __init__(self, taps: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if taps not in self.TAPS:
            raise ValueError(f"taps must be one of {self.TAPS}, not {taps!r}")
        self.taps = taps

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        # Mirroring needs as many pixels as it adds: the stride-1 max's grid (side - 1) must
        # be at least (taps - 1) / 2, which only the 5-tap filter on a 2x2 grid misses.
        edge = (self.taps - 1) // 2
        if any(side is not None and side - 1 < edge for side in input_shape[1:3]):
            raise ValueError(f"a {self.taps}-tap blur pooling needs grids of at least {edge + 1}")
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        pooled = tf.nn.max_pool2d(inputs, ksize=2, strides=1, padding="VALID")
        edge = (self.taps - 1) // 2
        padded = tf.pad(pooled, [[0, 0], [edge, edge], [edge, edge], [0, 0]], mode="SYMMETRIC")
        # The binomial filter of n taps is [1, 1] convolved with itself n - 1 times, so the
        # n x n filter at stride 2 is n - 2 2x2 averages at stride 1 and one at stride 2: the
        # same numbers as a depthwise convolution, at a fraction of its cost on a CPU.
        smoothed = padded
        for _ in range(self.taps - 2):
            smoothed = tf.nn.avg_pool2d(smoothed, ksize=2, strides=1, padding="VALID")
        return tf.nn.avg_pool2d(smoothed, ksize=2, strides=2, padding="VALID")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "taps": self.taps}

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        batch, height, width, channels = input_shape
        return (
            batch,
            None if height is None else height // 2,
            None if width is None else width // 2,
            channels,
        )
