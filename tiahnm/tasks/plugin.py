"""Built-in tasks, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_tasks(register: Register) -> None:
    """Register the built-in tasks."""
    from tiahnm.tasks.classification import BinaryTask, MulticlassTask
    from tiahnm.tasks.regression import RegressionOptions, RegressionTask
    from tiahnm.tasks.survival import SurvivalOptions, SurvivalTask

    register(
        "binary", BinaryTask, description="Two classes: cross-entropy, AUC, threshold"
    )
    register(
        "multiclass",
        MulticlassTask,
        description="C > 2 classes: macro one-vs-rest AUC, kappa (quadratic if ordinal)",
    )
    register(
        "survival",
        SurvivalTask,
        options=SurvivalOptions,
        description="Censored times: discrete-time NLL or Cox (Breslow/Efron), c-index",
    )
    register(
        "regression",
        RegressionTask,
        options=RegressionOptions,
        description="Continuous target: MSE / Huber, MAE, RMSE, R2, Pearson, Spearman",
    )
