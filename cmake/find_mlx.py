"""Print the directory holding MLX's CMake package config (MLXConfig.cmake).

On Linux the build depends on ``mlx-cpu``, which carries libmlx, the headers and
the CMake config but not ``mlx.core``, so this looks the file up on disk instead
of importing MLX. ``mlx`` is a namespace package: any entry of its search path
may be the installed one. Exits 1 when none has the config.
"""

import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("mlx")
for location in (spec.submodule_search_locations or []) if spec else []:
    config_dir = pathlib.Path(location) / "share" / "cmake" / "MLX"
    if (config_dir / "MLXConfig.cmake").is_file():
        print(config_dir)
        sys.exit(0)
sys.exit(1)
