"""The study as a queue of exactly N: ``handle`` (an open study), ``records`` (every attribute hpo
stores in it, typed), ``queue`` (top-ups, pops, retries), ``identity`` (open or join, refusing another
config), ``reads`` (best, summaries), ``samplers``, ``faults`` (dead workers, failure budgets) and
``progress``."""
