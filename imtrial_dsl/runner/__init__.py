"""The local runner: per-exam pipeline steps over real DICOM, with an embedded default
(folder inbox, folder archive, SQLite state in the workdir)."""
