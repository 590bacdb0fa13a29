"""The search: from an experiment config to a study of evaluated candidates.

* :mod:`nas.search.context`: :func:`~nas.search.context.prepare` assembles what every trial
  needs once per process (data, split, gallery model and its cached embeddings, space,
  budgets, loss).
* :mod:`nas.search.optuna_setup`: the sampler, pruner and storage registries and
  :func:`~nas.search.optuna_setup.open_study`.
* :mod:`nas.search.evaluators`: how one candidate is evaluated (the :class:`Evaluator`
  interface and its registry, ``search.strategy``); training from scratch is the first.
* :mod:`nas.search.objective`: one trial: architecture -> budgets -> evaluation -> record.
* :mod:`nas.search.coordination`: how processes sharing one study stay exact: the count
  rule, the sampler's sequence across resumes, the trials of dead processes.
* :mod:`nas.search.driver`: the loop (locks, heartbeats, progress, warm start) and
  :func:`~nas.search.driver.run_search`.
* :mod:`nas.search.workers`: several worker processes on one machine.

The package imports none of its modules itself, so that the config can import the
registries of :mod:`nas.search.optuna_setup` without importing the driver.
"""
