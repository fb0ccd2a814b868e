"""Feedback at the scanner: a Storage SCP that judges each series as it completes (:mod:`.service`), through
the pipeline's own classification, adherence and QC steps (:mod:`.judge`)."""
