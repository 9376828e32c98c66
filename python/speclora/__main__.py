"""``python -m speclora``: the command line, plus ``--cmake-dir`` for C++ builds.

``python -m speclora --cmake-dir`` prints the directory holding the installed
``specloraConfig.cmake`` (pass it as ``-Dspeclora_DIR=...`` or append it to
``CMAKE_PREFIX_PATH``), as ``python -m mlx --cmake-dir`` does for MLX.
"""

import sys
from pathlib import Path


def cmake_dir() -> Path:
    """``<site-packages>/speclora/share/cmake/speclora``: installed beside the extension."""
    import importlib.util

    spec = importlib.util.find_spec("speclora._ext")
    if spec is None or spec.origin is None:
        raise SystemExit("speclora's native extension is not installed; run `pip install .`")
    return Path(spec.origin).parent / "share" / "cmake" / "speclora"


if sys.argv[1:] == ["--cmake-dir"]:
    print(cmake_dir())
    sys.exit(0)

from speclora.cli import main  # noqa: E402  (only when not answering --cmake-dir)

sys.exit(main())
