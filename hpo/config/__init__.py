"""The study file: its sections (``schema``), reading and validating it once (``study_file``), and
its search space (``space``). Everything above trusts what this layer hands it."""
