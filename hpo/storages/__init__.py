"""Where studies live: ``rdb`` opens Optuna's RDBStorage retried while the database is away
(``retries``), with cross-process ``locks``; ``owned`` cuts a worker's round trips; ``remote`` is a
grpc:// client of `hpo proxy`."""
