"""Training, in the recipe's order: ``data`` (uint8 images on the device), ``augment`` (batched on
the device, or albumentations), ``models``, ``loop`` (``fit``), ``population`` (many members as
one), ``runs`` (one run and its records), ``checkpoints``, ``checks`` (the sanity gate) and
``records`` (what it reports, torch-free). torch, no Optuna: the study plugs in through callbacks."""
