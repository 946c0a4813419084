"""The study runner: one command per result row (``chunkpolicy study run ROW --study FILE``), resumable, and an
aggregator building the tables and plots (``chunkpolicy study aggregate DIR``). See :mod:`chunkpolicy.study.config`
for the YAML format and :mod:`chunkpolicy.study.runner` for what a row does."""
