"""The one place lungxray touches keras-tuner internals, checked against the installed version.

keras-tuner has no public hook for "try the defaults first", for building a Hyperband tuner
around an oracle of our own, or for counting a Hyperband iteration's trials. Those three uses of
private members live here; :func:`check` fails loudly, naming the missing member, when an upgrade
removes or renames one, instead of tuning silently differently.
"""

from __future__ import annotations

import keras_tuner as kt

from lungxray.errors import ConfigError

TESTED_VERSIONS = ("1.4.7", "1.4.8")  # the private members below were read in these
# (owner, member) pairs this module relies on.
PRIVATE_MEMBERS = (
    (kt.oracles.HyperbandOracle, "_random_values"),
    (kt.oracles.BayesianOptimizationOracle, "_random_values"),
    (kt.oracles.RandomSearchOracle, "_random_values"),
    (kt.oracles.HyperbandOracle, "_get_num_brackets"),
    (kt.oracles.HyperbandOracle, "_get_size"),
)


def check() -> None:
    """Raise :class:`ConfigError` if the installed keras-tuner lacks a private member used here,
    or if ``kt.Hyperband`` no longer runs its trials through ``kt.Tuner``'s constructor."""
    missing = [f"{owner.__name__}.{name}" for owner, name in PRIVATE_MEMBERS
               if not callable(getattr(owner, name, None))]
    if not issubclass(kt.Hyperband, kt.Tuner):
        missing.append("Hyperband as a subclass of Tuner")
    if missing:
        raise ConfigError(f"keras-tuner {kt.__version__} is incompatible with lungxray (tested "
                          f"with {', '.join(TESTED_VERSIONS)}): missing {', '.join(missing)}")


class _DefaultsFirst:
    """Oracle mixin: the first trial is the space's default point (train's untuned
    hyperparameters), later ones keras-tuner's own draws.

    keras-tuner draws every trial, the first too, so a short search could end with nothing as
    good as the defaults it never tried: with 2-3 trials all scratch learning rates came out
    near 1e-5, and the defaults (1e-4) trained ResNet152V2 to a far better val AUC."""

    def _random_values(self):
        if not self.trials:  # trials are saved, so a resumed search does not repeat it
            space = self.get_space()
            return {hp.name: hp.default for hp in space.space if space.is_active(hp)}
        return super()._random_values()


class HyperbandOracle(_DefaultsFirst, kt.oracles.HyperbandOracle):
    pass


class BayesianOracle(_DefaultsFirst, kt.oracles.BayesianOptimizationOracle):
    pass


class RandomOracle(_DefaultsFirst, kt.oracles.RandomSearchOracle):
    pass


class HyperbandOnOracle(kt.Hyperband):
    """``kt.Hyperband``'s trial logic (epochs per bracket) around a given oracle."""

    def __init__(self, oracle: kt.Oracle, hypermodel: kt.HyperModel, **kwargs):
        # kt.Hyperband.__init__ would build its own oracle from its arguments.
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)


def hyperband_trials_per_iteration(max_epochs: int, factor: int, objective: kt.Objective
                                   ) -> int:
    """How many trials one Hyperband iteration runs (all brackets, all rounds), computed by
    keras-tuner's own oracle so it cannot disagree with it."""
    oracle = kt.oracles.HyperbandOracle(objective, max_epochs=max_epochs, factor=factor)
    brackets = oracle._get_num_brackets()
    return sum(oracle._get_size(b, r) for b in range(brackets) for r in range(b + 1))
