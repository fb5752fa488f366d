"""What every layer of Strata may use, and nothing of the project itself: the errors a user must fix
(``core/errors.py``), writing a file so that readers only ever see a complete one (``core/files.py``), reading
weights files with errors that name the file (``core/checkpoint_files.py``), and counting a model's parameters and
multiply-adds (``core/model_cost.py``)."""
