"""``python -m speclora.zoo build [--out DIR] [--quick]``."""

import speclora  # noqa: F401  (loads OpenBLAS before mlx.core)
from speclora.zoo.build import main

main()
