"""Programs that run on a partition: the reference runtime-aware application (rtaware_editor)."""
