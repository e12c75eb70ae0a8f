"""Keras layers of the classifier that Keras does not ship in the form training needs.

Imported only by the functions that build a model, so importing the package (the gateway does)
never loads TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
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
