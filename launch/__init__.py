"""Ray launcher: placement, supervision, job submission (importable as lctrain.launch)."""
