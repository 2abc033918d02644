"""Trials trained as members of a population by `hpo run --population K`: each is still its own trial."""

import optuna
import pytest
from conftest import hpo_cli
from optuna.trial import TrialState

# lr 10 with weight decay 1 diverges (NaN); lr 10 alone and weight decay 1 alone learn nothing and
# stop early; lr 0.01 learns. (At lr 0.05 the run turns chaotic after epoch 3: rounding, in either
# run, then sets two runs apart.)
GRID = """augment = "none"
[study]
n_trials = 4
sampler = "grid"
[train]
epochs = 6
patience = 2
optimizer = "sgd"
[search]
"train.lr" = [10.0, 0.01]
"train.weight_decay" = [1.0, 0.0]
"""


def run(study_file, tmp_path, db: str, *extra) -> dict[tuple[float, float], optuna.trial.FrozenTrial]:
    """The grid's trials by (lr, weight decay)."""
    url = f"sqlite:///{tmp_path / db}"
    r = hpo_cli("run", study_file(GRID), "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                "--artifacts", tmp_path / "a", *extra)
    assert r.returncode == 0, r.stderr
    return {(t.params["train.lr"], t.params["train.weight_decay"]): t
            for t in optuna.load_study(study_name="small", storage=url).trials}


def test_members_fail_and_stop_early_on_their_own_as_their_solo_runs(study_file, tmp_path):
    together = run(study_file, tmp_path, "population.db", "--population", "4")
    alone = run(study_file, tmp_path, "solo.db")
    diverged = together[10.0, 1.0]
    assert diverged.state == TrialState.FAIL and diverged.user_attrs["fail_reason"].startswith("TrainingDiverged")
    assert len({t.user_attrs["population"] for t in together.values()}) == 1
    for key, t in together.items():
        solo = alone[key]
        assert (t.state, t.user_attrs.get("stop_reason"), t.user_attrs.get("epochs_run")) == \
            (solo.state, solo.user_attrs.get("stop_reason"), solo.user_attrs.get("epochs_run"))
        assert t.intermediate_values.keys() == solo.intermediate_values.keys()
        assert all(abs(t.intermediate_values[e] - v) <= 0.002 for e, v in solo.intermediate_values.items()), key
    assert sorted(t.user_attrs["stop_reason"] for t in together.values() if t.state == TrialState.COMPLETE) == \
        ["completed", "early_stopping", "early_stopping"]


@pytest.mark.parametrize("where", ["--population", "[study] population"])
def test_a_space_that_varies_what_members_share_is_refused_in_one_line(study_file, tmp_path, where):
    body = '[search]\n"model.hidden" = [16, 32]\n"train.lr" = [0.01, 0.001]\n'
    path = study_file(body if where == "--population" else "[study]\npopulation = 2\n" + body)
    flag = ["--population", "2"] if where == "--population" else []
    r = hpo_cli("run", path, "--storage", f"sqlite:///{tmp_path / 'study.db'}", *flag, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "hpo: population 2 (--population or [study] population): the search space varies model.hidden, which the "
        "members of a population share; use --population 1"]
    assert not (tmp_path / "study.db").exists()
