"""The command-line entry points, `python -m experiments.<name>`.

Importing this package, which every entry point does first, keeps
TensorFlow's C++ logs (TensorFlow serves only the input pipelines) to
errors; that has to happen before TensorFlow is imported.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
