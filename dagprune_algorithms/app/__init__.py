"""The ``dagprune`` command and its jobs: CLI, data sets, training loop, reports, latency, models.

The app imports the library (:mod:`dagprune`, :mod:`dagprune_algorithms.pruning`); the library
never imports the app. Its third-party packages (timm, scikit-learn, matplotlib, tqdm) are the
``app`` install extra: ``pip install "dagprune[app]"``. Its modules are imported by name
(``from dagprune_algorithms.app.data import load_dataset``), so that importing one job does not
pull in the packages of the others.
"""

__all__ = ["cli", "data", "dataset_split", "distributed", "errors", "image_folder", "iterative_job", "latency",
           "models", "prune_arguments", "prune_job", "report", "run_directory", "training", "units_command"]
