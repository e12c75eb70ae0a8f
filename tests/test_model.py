"""model: shapes, receptive field, causality, configuration round trip."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the model is a Keras/TensorFlow model")
keras = pytest.importorskip("keras")

from image_classifier.model import (  # noqa: E402
    ModelConfig,
    build_model,
    count_flops,
    flops_by_part,
    parameters_by_part,
    receptive_field,
    sequence_length,
    tcn_stack,
    validate_config,
)

SMALL = ModelConfig(stem_filters=(8, 16), tcn_filters=16, dropout=0.1)


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
