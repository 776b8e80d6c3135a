"""What the Slicer module needs that does not need Slicer: running the engine in a
separate process with progress and cancel, the panel's processing states, the
engine command lines. No ``slicer`` and no ``torch`` import here, so it is tested in CI."""
