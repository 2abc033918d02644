"""What runs trials: ``worker`` (one at a time; run_study, join_study, K processes), ``members``
(many at once, as one population), ``slots`` (what both share), ``runner`` (an attempt's end
becomes one trial state), ``exits`` (how a command ends) and ``proxy`` (`hpo proxy`)."""
