"""The storage calls of a worker's hot path, cut to the round trips they need (one worker on
PostgreSQL spent 50-112 ms of storage per trial, most of it re-reading what it had just written):

- the trials a worker runs are read once, when it takes them, and kept as it writes them: Optuna's
  ``tell`` re-reads a trial before finishing it, and a worker's own RUNNING trial changes only
  through the worker (another one may fail it after the grace period; the write that finishes
  it then fails, as Optuna's own check says);
- several attributes of a trial go in one transaction, not one commit each;
- the queue is looked up with one narrow query, not by reading every unfinished trial, and filled
  with a few batched statements, not a transaction per trial.

Mixins of hpo's storages: OwnedTrials of both, RDBShortcuts of the RDBStorage (hpo.storages.rdb, which
supplies ``_retried(fn, writes)``, its retries); Optuna's own methods do the writing.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.storages._rdb import models  # the schema: Optuna has no public query for the queue
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

FINISHED_KEPT = 8  # finished trials kept for reading back; they never change again


class OwnedTrials:
    """Keeps the FrozenTrial of each trial this process moved to RUNNING, and of the last few it finished."""

    def _owned(self) -> tuple[dict[int, FrozenTrial], threading.Lock]:
        if "_owned_trials" not in self.__dict__:  # set lazily: Optuna's __init__ and unpickling skip ours
            self.__dict__["_owned_trials"], self.__dict__["_owned_lock"] = {}, threading.Lock()
        return self.__dict__["_owned_trials"], self.__dict__["_owned_lock"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_owned_trials", None)
        state.pop("_owned_lock", None)
        return state

    def _update(self, trial_id: int, change: Any) -> None:
        owned, lock = self._owned()
        with lock:
            if trial_id in owned:
                change(owned[trial_id])

    def get_trial(self, trial_id: int) -> FrozenTrial:
        owned, lock = self._owned()
        with lock:
            if trial_id in owned:
                return copy.deepcopy(owned[trial_id])
        return super().get_trial(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        owned, lock = self._owned()
        if state == TrialState.RUNNING and values is None:  # a worker takes a queued trial
            taken = self._take(trial_id)
            if taken is not None:
                with lock:
                    owned[trial_id] = taken
            return taken is not None
        try:
            updated = super().set_trial_state_values(trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            with lock:  # another worker failed it meanwhile: what we kept is no longer the trial
                owned.pop(trial_id, None)
            raise
        if state.is_finished() and trial_id in owned:
            # Finished, it never changes again: kept for Optuna's read after tell, with the end
            # the storage stamped, and dropped once FINISHED_KEPT more have finished here.
            ended = self._ended_at(trial_id)
            with lock:
                if ended is None:
                    owned.pop(trial_id, None)
                elif trial_id in owned:
                    trial = owned.pop(trial_id)
                    trial.state, trial.values, trial.datetime_complete = state, values, ended
                    owned[trial_id] = trial
                    for old in [i for i, t in owned.items() if t.state.is_finished()][:-FINISHED_KEPT]:
                        del owned[old]
        return updated

    def _take(self, trial_id: int) -> FrozenTrial | None:
        """WAITING to RUNNING, as Optuna's set_trial_state_values does; the trial read whole, or None
        where it was not WAITING (another worker took it)."""
        if not super().set_trial_state_values(trial_id, TrialState.RUNNING):
            return None
        return super().get_trial(trial_id)

    def _ended_at(self, trial_id: int) -> datetime.datetime | None:
        """When the storage stamped the trial's end, if it can tell for less than reading the trial."""
        return None

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._update(trial_id, lambda t: t.user_attrs.__setitem__(key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._update(trial_id, lambda t: t.system_attrs.__setitem__(key, value))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._update(trial_id, lambda t: t.intermediate_values.__setitem__(step, intermediate_value))

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._remember_param(trial_id, param_name, param_value_internal, distribution)

    def _remember_param(self, trial_id: int, name: str, internal: float, distribution: BaseDistribution) -> None:
        def add(t: FrozenTrial) -> None:
            t.distributions = {**t.distributions, name: distribution}
            t.params = {**t.params, name: distribution.to_external_repr(internal)}

        self._update(trial_id, add)


class RDBShortcuts(OwnedTrials):
    """The same on Optuna's RDBStorage, with the calls it has no single round trip for."""

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes of a trial in one transaction."""

        def write() -> None:
            with _create_scoped_session(self.scoped_session, True) as session:
                for key, value in attrs.items():
                    self._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)

        self._retried(write, True)
        self._update(trial_id, lambda t: t.user_attrs.update(attrs))

    def create_waiting_trials(self, study_id: int, slots: Sequence[tuple[dict[str, Any], dict[str, Any]]],
                              dists: Mapping[str, BaseDistribution]) -> None:
        """WAITING trials with these (params, user attributes), in one transaction of a few batched
        statements; study.add_trial takes one transaction of about ten statements for each. Numbered
        as Optuna numbers them, under the study row's lock. The parameters are the study's own,
        of its fixed distributions: Optuna's check against earlier trials' distributions is left out."""

        def write() -> None:
            with _create_scoped_session(self.scoped_session) as session:
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                first = session.scalar(sqlalchemy.select(sqlalchemy.func.count(models.TrialModel.trial_id))
                                       .where(models.TrialModel.study_id == study_id))
                rows = [models.TrialModel(study_id=study_id, number=first + i, state=TrialState.WAITING)
                        for i in range(len(slots))]
                session.add_all(rows)
                session.flush()  # the rows' ids, for their params and attributes
                for row, (params, attrs) in zip(rows, slots, strict=True):
                    session.add_all([models.TrialParamModel(
                        trial_id=row.trial_id, param_name=k, param_value=dists[k].to_internal_repr(v),
                        distribution_json=distribution_to_json(dists[k])) for k, v in params.items()])
                    session.add_all([models.TrialUserAttributeModel(
                        trial_id=row.trial_id, key=k, value_json=json.dumps(v)) for k, v in attrs.items()])

        self._retried(write, True)

    def waiting_trial_ids(self, study_id: int, limit: int) -> list[int]:
        """The ids of the study's first ``limit`` WAITING trials, in trial order: one query."""
        trials = models.TrialModel

        def read() -> list[int]:
            query = (sqlalchemy.select(trials.trial_id)
                     .where(trials.study_id == study_id, trials.state == TrialState.WAITING)
                     .order_by(trials.number).limit(limit))
            with self.engine.connect() as conn:
                return list(conn.execute(query).scalars())

        return self._retried(read, False)

    def _set_trial_param(self, trial_id: int, name: str, internal: float, distribution: BaseDistribution,
                         *args: Any) -> None:
        """What Optuna's trial cache calls to store a sampled parameter (and RDBStorage.set_trial_param)."""
        super()._set_trial_param(trial_id, name, internal, distribution, *args)
        self._remember_param(trial_id, name, internal, distribution)

    def _take(self, trial_id: int) -> FrozenTrial | None:
        """One transaction: a conditional UPDATE (atomic on every database: it takes the row's lock),
        then what a queued trial holds (a number, parameters, attributes,
        a retry's intermediate values; no values yet) in plain queries, not through the ORM."""
        trials, params, user, system, curve = (m.__table__ for m in (
            models.TrialModel, models.TrialParamModel, models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel, models.TrialIntermediateValueModel))
        # Stamped in naive UTC, as Optuna's model stores it, and read back as local time, as it reads
        # it: as stored (MySQL keeps whole seconds).
        start = datetime.datetime.now().astimezone(datetime.UTC).replace(tzinfo=None)
        flip = (sqlalchemy.update(trials).where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=start))

        def rows(table: sqlalchemy.Table, *columns: str, order: str | None = None) -> list:
            query = sqlalchemy.select(*(table.c[c] for c in columns)).where(table.c.trial_id == trial_id)
            return conn.execute(query.order_by(table.c[order]) if order else query).all()

        def take() -> FrozenTrial | None:
            nonlocal conn
            with self.engine.begin() as conn:
                if conn.execute(flip).rowcount != 1:
                    return None
                number, started = conn.execute(sqlalchemy.select(trials.c.number, trials.c.datetime_start)
                                               .where(trials.c.trial_id == trial_id)).one()
                stored = rows(params, "param_name", "param_value", "distribution_json", order="param_id")
                dists = {name: json_to_distribution(d) for name, _, d in stored}
                return FrozenTrial(
                    number=number, state=TrialState.RUNNING, value=None, values=None,
                    datetime_start=started.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None),
                    datetime_complete=None, trial_id=trial_id, distributions=dists,
                    params={name: dists[name].to_external_repr(v) for name, v, _ in stored},
                    user_attrs={k: json.loads(v) for k, v in rows(user, "key", "value_json")},
                    system_attrs={k: json.loads(v) for k, v in rows(system, "key", "value_json")},
                    intermediate_values={step: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                        v, kind) for step, v, kind in
                        rows(curve, "step", "intermediate_value", "intermediate_value_type")})

        conn = None
        return self._retried(take, True)

    def _ended_at(self, trial_id: int) -> datetime.datetime | None:
        def read() -> datetime.datetime | None:
            with sqlalchemy.orm.Session(self.engine) as session:  # the trials row alone, as Optuna reads it
                return session.get(models.TrialModel, trial_id).datetime_complete

        return self._retried(read, False)
