"""keras-tuner's private members behind one door: the defaults-first oracles start every search
at the space's default point, then draw as keras-tuner would."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from lungxray import tuner_compat


def _space() -> kt.HyperParameters:
    hp = kt.HyperParameters()
    hp.Float("rate", 1e-4, 1e-1, sampling="log", default=3e-3)
    hp.Choice("units", [16, 32, 64, 128], default=64)
    return hp


@pytest.mark.parametrize("oracle_class", [tuner_compat.RandomOracle, tuner_compat.BayesianOracle,
                                          tuner_compat.HyperbandOracle])
def test_the_first_trial_is_the_default_point_and_later_ones_are_drawn(oracle_class):
    objective = kt.Objective("val_auc", "max")
    kwargs = {"max_epochs": 3} if oracle_class is tuner_compat.HyperbandOracle else {
        "max_trials": 5}
    oracle = oracle_class(objective, seed=1, hyperparameters=_space(), **kwargs)
    assert oracle._random_values() == {"rate": 3e-3, "units": 64}
    oracle.trials["0"] = object()  # a search that has run a trial (or resumed one) draws
    drawn = [oracle._random_values() for _ in range(5)]
    assert any(values != {"rate": 3e-3, "units": 64} for values in drawn)
    assert all(1e-4 <= values["rate"] <= 1e-1 for values in drawn)
