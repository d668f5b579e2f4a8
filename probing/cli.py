"""Deprecated launcher: the command line lives in `experiments.cli` (``mechprobe``).

``python -m probing.cli ...`` (e.g. under ``accelerate launch``) still works: it runs
``experiments.cli`` as the main module. Nothing imports this file, so the one-way layering
(probing never imports experiments) holds; tests/test_layering.py names it as the one launcher.
"""

if __name__ == "__main__":
    import runpy
    import warnings

    warnings.warn("python -m probing.cli is deprecated; use mechprobe or python -m experiments.cli",
                  DeprecationWarning, stacklevel=1)
    runpy.run_module("experiments.cli", run_name="__main__", alter_sys=True)
