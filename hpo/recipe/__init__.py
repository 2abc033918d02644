"""The recipe end to end: ``explore`` the data, ``retrain`` the best on the full split, ``report``
a study, and ``pipeline``, every step in order in one command."""
